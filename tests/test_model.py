import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptlab import blocked_attention
from gptlab import dense_backward as dense_backward_lib
from gptlab import lora
from gptlab.model import GPT, GPTConfig, ParamInfo, attend, count_params, describe, init_params, rope
from gptlab.optim import param_paths


def gpt2_formula(cfg: GPTConfig) -> int:
    """GPT-2 parameter count without position embeddings, from the architecture."""
    d, b = cfg.n_embd, int(cfg.bias)
    per_block = (3 * d * d + 3 * d * b) + (d * d + d * b) + (4 * d * d + 4 * d * b) + (4 * d * d + d * b)
    per_block += 2 * (d + d * b)  # two LayerNorms
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.n_layer * per_block + cfg.vocab_size * d + (d + d * b) + head


def test_baby_gpt_has_nanogpts_parameter_count():
    # nanoGPT's shakespeare_char model (bias=False) reports "number of parameters: 10.65M".
    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert count_params(shapes) == 10_646_784 == gpt2_formula(cfg)
    assert round(count_params(shapes) / 1e6, 2) == 10.65


@pytest.mark.parametrize("bias,tie", [(True, True), (True, False), (False, False)])
def test_parameter_count_matches_formula(bias, tie):
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=48, bias=bias, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    assert count_params(params) == gpt2_formula(cfg)
    assert count_params(params, exclude_position_embeddings=False) == gpt2_formula(cfg) + 32 * 48


def test_parameter_paths_are_readable_and_stable():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, tie_embeddings=False)
    paths = param_paths(init_params(cfg, jax.random.key(0)))
    for expected in ("blocks_1/attn/qkv/kernel", "blocks_0/attn/proj/bias", "blocks_1/mlp/fc/kernel",
                     "blocks_0/ln_1/scale", "ln_f/bias", "wte/embedding", "wpe/embedding", "lm_head/kernel"):
        assert expected in paths


def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=64, block_size=64, n_layer=8, n_head=4, n_embd=256)
    params = init_params(cfg, jax.random.key(0))
    block = params["blocks_0"]
    assert np.std(block["attn"]["qkv"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(block["mlp"]["proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(16), rel=0.05)
    assert np.std(block["attn"]["proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(16), rel=0.05)
    assert np.all(block["attn"]["qkv"]["bias"] == 0) and np.all(block["ln_1"]["scale"] == 1)


@pytest.mark.parametrize("attention", ["xla", "explicit", "blocked"])
def test_causality_changing_token_t_never_changes_earlier_logits(attention):
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, attention=attention)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    logits = GPT(cfg).apply({"params": params}, tokens)
    for t in (0, 7, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 50)
        other = GPT(cfg).apply({"params": params}, changed)
        np.testing.assert_array_equal(logits[:, :t], other[:, :t])
        assert not np.allclose(logits[:, t], other[:, t])


@pytest.mark.parametrize("seq_len,query_block,kv_heads", [(16, 4, 4), (13, 4, 4), (16, 64, 4), (12, 5, 2)])
def test_blocked_attention_has_the_explicit_forms_values_and_gradients(seq_len, query_block, kv_heads):
    # Blocks that divide the sequence, a last partial block, one block, grouped-query heads.
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, seq_len, 4, 8))
    k, v = (jax.random.normal(key, (2, seq_len, kv_heads, 8)) for key in keys[1:3])
    upstream = jax.random.normal(keys[3], q.shape)
    explicit = lambda q, k, v: attend(q, k, v, jnp.tril(jnp.ones((1, seq_len, seq_len), bool)))
    blocked = lambda q, k, v: blocked_attention.causal_attention(q, k, v, query_block)
    np.testing.assert_allclose(blocked(q, k, v), explicit(q, k, v), atol=1e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * upstream), argnums=(0, 1, 2))(q, k, v)
             for f in (blocked, explicit)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_blocked_attention_in_bfloat16_stays_close_to_float32():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 24, 2, 16)) for i in range(3))
    want = blocked_attention.causal_attention(q, k, v, 8)
    got = blocked_attention.causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), 8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05)


def test_attention_implementations_agree_and_tied_head_is_the_embedding():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    xla = GPT(cfg).apply({"params": params}, tokens)
    for attention in ("explicit", "blocked"):
        other = GPT(dataclasses.replace(cfg, attention=attention)).apply({"params": params}, tokens)
        np.testing.assert_allclose(xla, other, atol=1e-5)
    hidden = GPT(cfg).apply({"params": params}, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden @ params["wte"]["embedding"].T, xla, atol=1e-5)


def test_dropout_is_active_only_in_training_and_bf16_compute_keeps_f32_params():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.5, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.ones((1, 16), jnp.int32)
    model = GPT(cfg)
    eval_a, eval_b = (model.apply({"params": params}, tokens) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert eval_a.dtype == jnp.bfloat16
    train_a = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a.astype(np.float32), train_b.astype(np.float32))


def test_bad_model_config_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="not divisible by model.n_head"):
        GPTConfig(vocab_size=10, block_size=8, n_embd=30, n_head=4)
    cfg = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_narrow_transpose_backward_gives_the_same_gradients():
    """model.dense_backward only changes how kernel gradients are laid out, not what they are."""
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    adapters = lora.LoRA(rank=2, alpha=16.0, targets=(r"blocks_\d+/attn/(qkv|proj)/kernel",))
    params = lora.add(init_params(cfg, jax.random.key(0)), adapters, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, 50)

    def grads(dense_backward):
        model = lora.Adapted(GPT(cfg, dot_general=dense_backward_lib.dot_general(dense_backward)), adapters.scale)
        return jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(params)

    (loss, expected), (loss_nt, actual) = grads("xla"), grads("narrow_transpose")
    assert loss == loss_nt
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# --- Llama-style: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases ----------

LLAMA = GPTConfig(vocab_size=53, block_size=16, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, bias=False,
                  tie_embeddings=False, position="rope", rope_theta=5000.0, norm="rmsnorm", mlp="swiglu", mlp_hidden=80)


def llama_formula(cfg: GPTConfig) -> int:
    d, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
    per_block = d * (d + 2 * kv) + d * d + 3 * d * cfg.hidden + 2 * d
    return cfg.n_layer * per_block + cfg.vocab_size * d * (1 + (not cfg.tie_embeddings)) + d


def test_llama_style_parameters_roles_and_counts():
    params = init_params(LLAMA, jax.random.key(0))
    assert count_params(params) == llama_formula(LLAMA)  # no position embeddings to leave out
    assert count_params(params, non_embedding=True) == llama_formula(LLAMA) - 53 * 48
    infos = describe(params)
    assert set(infos) == set(param_paths(params))  # the model describes every parameter it has
    assert {p for p, i in infos.items() if i.role == "norm"} == {
        "blocks_0/ln_1/scale", "blocks_0/ln_2/scale", "blocks_1/ln_1/scale", "blocks_1/ln_2/scale", "ln_f/scale"}
    assert {p for p, i in infos.items() if i.is_head} == {"lm_head/kernel"}
    assert not any(i.leaf == "bias" for i in infos.values())
    assert params["blocks_1"]["attn"]["qkv"]["kernel"].shape == (48, 48 + 2 * 16)  # 6 query heads, 2 kv heads of 8
    assert infos["blocks_1/mlp/gate/kernel"] == ParamInfo("mlp", "block", 1, "kernel", False)
    gpt2 = describe(init_params(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), jax.random.key(0)))
    assert gpt2["wte/embedding"].is_head and gpt2["wpe/embedding"].role == "position"


def test_grouped_query_attention_equals_multi_head_attention_with_shared_keys():
    """Each of the 6 query heads attends with key/value head h // 3: as MHA with those heads repeated."""
    params = init_params(LLAMA, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 53)
    mha = dataclasses.replace(LLAMA, n_kv_head=0)
    d, hd = 48, 8
    qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]
    repeat = lambda w: jnp.repeat(w.reshape(d, 2, hd), 3, axis=1).reshape(d, 6 * hd)
    widened = jax.tree.map(lambda x: x, params)
    for block in ("blocks_0", "blocks_1"):
        qkv = params[block]["attn"]["qkv"]["kernel"]
        q, k, v = qkv[:, :d], qkv[:, d:d + 2 * hd], qkv[:, d + 2 * hd:]
        widened[block]["attn"]["qkv"]["kernel"] = jnp.concatenate([q, repeat(k), repeat(v)], axis=1)
    for attention in ("xla", "explicit", "blocked"):
        gqa = GPT(dataclasses.replace(LLAMA, attention=attention)).apply({"params": params}, tokens)
        np.testing.assert_allclose(gqa, GPT(mha).apply({"params": widened}, tokens), atol=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA, dataclasses.replace(LLAMA, n_kv_head=1, tie_embeddings=True, qkv_bias=True)])
def test_llama_style_model_is_causal_and_rotary_positions_are_relative(cfg):
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 53)
    logits = GPT(cfg).apply({"params": params}, tokens)
    changed = GPT(cfg).apply({"params": params}, tokens.at[:, 9].set((tokens[:, 9] + 1) % 53))
    np.testing.assert_array_equal(logits[:, :9], changed[:, :9])
    # Rotary embeddings make a query-key score depend on the positions' difference only.
    q, k = jax.random.normal(jax.random.key(2), (2, 1, 5, 1, 8))
    score = lambda i, j: jnp.sum(rope(q, jnp.array([[i]]), 5000.0) * rope(k, jnp.array([[j]]), 5000.0), axis=-1)
    np.testing.assert_allclose(score(7, 3), score(4, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_scanned_blocks_compute_what_the_loop_computes():
    for cfg in (GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32), LLAMA):
        looped = init_params(cfg, jax.random.key(0))
        scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
        stacked = {k: v for k, v in looped.items() if not k.startswith("blocks_")}
        stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[looped[f"blocks_{i}"] for i in range(cfg.n_layer)])
        assert jax.tree.structure(stacked) == jax.tree.structure(init_params(scanned_cfg, jax.random.key(0)))
        tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
        np.testing.assert_allclose(GPT(scanned_cfg).apply({"params": stacked}, tokens),
                                   GPT(cfg).apply({"params": looped}, tokens), atol=2e-5)
        infos = describe(stacked)
        assert infos["blocks/attn/qkv/kernel"].stage == "block" and infos["blocks/attn/qkv/kernel"].layer is None
        assert count_params(stacked) == count_params(looped)
