"""KV-cache sampling: the cache computes what the full forward pass computes, and the knobs do what they say."""
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from gptlab import checkpoint as checkpoint_lib
from gptlab import sampling, train
from gptlab.errors import UserError
from gptlab.model import GPT, GPTConfig, init_cache, init_params

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=3, n_embd=24)


@functools.partial(jax.jit, static_argnames=("cfg", "scale", "seed"))
def random_params(cfg=CFG, scale=0.3, seed=0):
    """Initial parameters plus noise: a random model whose greedy continuations vary (plain init repeats one token)."""
    leaves, treedef = jax.tree.flatten(init_params(cfg, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@jax.jit
def logits(params, tokens):
    return GPT(CFG).apply({"params": params}, tokens)


def test_prefill_then_one_token_at_a_time_gives_the_full_forward_logits():
    params = random_params()
    tokens = jax.random.randint(jax.random.key(2), (2, CFG.block_size), 0, CFG.vocab_size)
    full = logits(params, tokens)
    # Rows at different positions in one call: row 0 prefills 5 tokens, row 1 prefills 9.
    lengths = jnp.array([5, 9])
    apply = jax.jit(lambda tokens, cache, index: GPT(CFG).apply(
        {"params": params, "cache": cache}, tokens, cache_index=index, mutable=["cache"]))
    out, cache = apply(tokens[:, :9], init_cache(CFG, 2), jnp.zeros(2, jnp.int32))  # cache: {"cache": ...}
    np.testing.assert_allclose(out[0, :5], full[0, :5], atol=1e-5)
    np.testing.assert_allclose(out[1], full[1, :9], atol=1e-5)
    for step in range(CFG.block_size - 9):
        position = lengths + step
        token = tokens[jnp.arange(2), position][:, None]
        out, cache = apply(token, cache["cache"], position)
        np.testing.assert_allclose(out[:, 0], full[jnp.arange(2), position], atol=1e-5)


# Llama-style: rotary positions, RMSNorm, SwiGLU, 6 query heads sharing 2 key/value heads, no biases, untied.
LLAMA = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=6, n_kv_head=2, n_embd=24, bias=False,
                  tie_embeddings=False, position="rope", norm="rmsnorm", mlp="swiglu")


@pytest.mark.parametrize("cfg", [CFG, LLAMA, dataclasses.replace(LLAMA, scan_layers=True)],
                         ids=["gpt2", "llama", "llama-scanned"])
def test_greedy_with_the_cache_equals_greedy_by_full_recompute_for_a_batch_of_different_lengths(cfg):
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (5, 1, 16, 23)]
    with pytest.warns(UserWarning, match="prompt 3 has 23 tokens, more than the model's context of 16"):
        outputs = sampling.generate(params, cfg, prompts, 40, temperature=0.0)
    # 40 new tokens run far past the 16-token context, so the cache is rebuilt several times per row.
    for prompt, output in zip(prompts, outputs):
        expected = sampling.greedy_by_recompute(params, cfg, prompt, 40)
        np.testing.assert_array_equal(output, expected)
        assert len(set(output.tolist())) > 2  # a real test: the continuation is not one repeated token


def test_each_row_stops_at_the_end_token():
    params = random_params()
    prompts = [[3, 4, 5], [7], [9, 1, 9]]
    free = sampling.generate(params, CFG, prompts, 12, temperature=0.0)
    end = int(free[0][3])
    stopped = sampling.generate(params, CFG, prompts, 12, temperature=0.0, end_token=end)
    for row, out in zip(free, stopped):
        first = list(row).index(end) if end in row else len(row)
        np.testing.assert_array_equal(out, row[:first])
    assert len(stopped[0]) <= 3


def test_seed_temperature_and_filters_change_samples_without_recompiling():
    params = random_params(scale=0.1)
    prompts = [[1, 2, 3]] * 3  # the shape of the end-token test: compiled already when run after it
    a = sampling.generate(params, CFG, prompts, 12, temperature=1.0, seed=0)
    compiled = sampling._generate._cache_size()
    b = sampling.generate(params, CFG, prompts, 12, temperature=1.0, seed=0)
    c = sampling.generate(params, CFG, prompts, 12, temperature=1.0, seed=1)
    sampling.generate(params, CFG, prompts, 12, temperature=0.5, top_k=5, top_p=0.9, seed=2, end_token=7)
    assert sampling._generate._cache_size() == compiled  # compiled once for this shape
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], a[1])  # each row draws its own randomness: num_samples differ


def test_filter_logits_keeps_exactly_top_k_and_the_top_p_nucleus():
    logits = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    kept = lambda **kw: set(np.flatnonzero(np.isfinite(sampling.filter_logits(logits, **kw))).tolist())
    assert kept(temperature=1.0, top_k=0, top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(temperature=1.0, top_k=2, top_p=1.0) == {1, 3}
    assert kept(temperature=1.0, top_k=1, top_p=1.0) == {1}
    assert kept(temperature=1.0, top_k=0, top_p=0.5) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 reaches it
    assert kept(temperature=1.0, top_k=0, top_p=0.4) == {1}
    assert kept(temperature=1.0, top_k=0, top_p=0.8) == {1, 3, 4}
    assert kept(temperature=1.0, top_k=2, top_p=0.9) == {1, 3}  # top-k first, then the nucleus
    scaled = sampling.filter_logits(logits, temperature=0.5, top_k=0, top_p=1.0)
    np.testing.assert_allclose(scaled, logits / 0.5, rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    params = random_params(scale=0.1)
    prompt = [1, 2, 3]
    last = logits(params, jnp.asarray([prompt]))[0, -1]
    top3 = np.argsort(-np.asarray(last))[:3]
    probs = np.asarray(jax.nn.softmax(last[top3] / 0.7))
    draws = np.concatenate(sampling.generate(params, CFG, [prompt] * 2000, 1, temperature=0.7, top_k=3, seed=5))
    assert set(draws.tolist()) <= set(top3.tolist())
    frequencies = np.array([(draws == t).mean() for t in top3])
    np.testing.assert_allclose(frequencies, probs, atol=0.05)


def test_bad_sampling_input_is_refused_with_the_fix():
    params = random_params()
    with pytest.raises(UserError, match="prompt 1 is empty"):
        sampling.generate(params, CFG, [[1], []], 5)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sampling.generate(params, CFG, [[1, 50]], 5)
    with pytest.raises(UserError, match="max_new_tokens=0"):
        sampling.generate(params, CFG, [[1]], 0)
    with pytest.raises(UserError, match="top_p=0"):
        sampling.generate(params, CFG, [[1]], 5, top_p=0.0)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, data_dir):
    """A real (2-step) pretraining workdir with a character vocabulary."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("char_run")
    train.train_and_evaluate(tiny_config(data_dir, train__num_steps=1, train__eval_every=1,
                                         train__eval_batches=1, data__tokenizer="char"), workdir)
    return workdir


def _sample(*args):
    return subprocess.run([sys.executable, "-m", "experiments.sample", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_sample_entry_point_on_a_pretraining_workdir(char_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main():\n    ")
    result = _sample(f"--workdir={char_run}", f"--prompt_file={prompt}", "--num_samples=3", "--max_new_tokens=90")
    assert result.returncode == 0, result.stderr
    assert f"loaded step 1 from {char_run / 'checkpoints' / '1'}" in result.stdout
    samples = result.stdout.split("--- sample ")[1:]
    assert len(samples) == 3 and all("def main():\n    " in s for s in samples)
    # Characters outside the run's vocabulary cannot be encoded: refused with the fix, not mapped to <|unk|>.
    ckpts = checkpoint_lib.Checkpoints(char_run / "checkpoints")
    chars = ckpts.read_json(1, "tokenizer")["chars"]
    ckpts.close()
    unknown = next(c for c in "\u2603\u4e00\U0001f600\u00e9" if c not in chars)
    result = _sample(f"--workdir={char_run}", f"--prompt=x{unknown}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not in the character vocabulary" in result.stderr.strip().splitlines()[-1]
