"""Every number a user publishes, checked against an answer computed here another way.

LoRA against the explicit W + (alpha / rank) A B; the loss and its masks against a
numpy log-softmax; accuracy, macro-F1 and the confusion matrix on known predictions;
bits per byte by hand on a short text; sft exact match and parse rate on crafted
completions; and strategy masks by hand.
Selection, early stopping and the study's statistics: test_independent_statistics.py.
dev/mutation.sh scores the code under these tests.
"""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from conftest import needs
from gptlab import adapt, convert, evaluate, finetune, lora, optim, sampling
from gptlab import steps as steps_lib
from gptlab.data import pipeline, supervised
from gptlab.errors import UserError
from gptlab.model import GPT, GPTConfig
from gptlab.model import init_params as gpt_init
from gptlab.tokenizers import CharTokenizer

TINY = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# -- LoRA ----------------------------------------------------------------------------------------


def test_lora_logits_are_those_of_the_explicit_low_rank_update():
    settings = lora.LoRA(rank=2, alpha=5.0, targets=(r"blocks_\d+/attn/qkv/kernel", r"blocks_1/mlp/fc/kernel"))
    assert settings.scale == 2.5  # alpha / rank, alpha != rank so a lost factor shows
    base = gpt_init(TINY, jax.random.key(0))
    adapted = lora.add(base, settings, jax.random.key(1))
    # Trained adapters: B nonzero.
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(optim.path_str(p))), x.shape)
        if optim.path_str(p).endswith("lora_b") else x, adapted)
    explicit = jax.tree.map(np.asarray, base)
    targets = ["blocks_0/attn/qkv/kernel", "blocks_1/attn/qkv/kernel", "blocks_1/mlp/fc/kernel"]
    for path in targets:
        module = path.rsplit("/", 1)[0]
        a, b = (np.asarray(leaf(adapted, f"{module}/{n}"), np.float64) for n in ("lora_a", "lora_b"))
        w = np.asarray(leaf(base, path), np.float64)
        leaf(explicit, module)["kernel"] = (w + 5.0 / 2 * a @ b).astype(np.float32)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, TINY.vocab_size)
    got = lora.Adapted(GPT(TINY), settings.scale).apply({"params": adapted}, tokens)
    want = GPT(TINY).apply({"params": explicit}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want, GPT(TINY).apply({"params": base}, tokens), atol=1e-3)  # the update matters
    # Keyword arguments reach the model (a classifier reads the hidden states of an adapted model).
    hidden = lora.Adapted(GPT(TINY), settings.scale).apply({"params": adapted}, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden, GPT(TINY).apply({"params": explicit}, tokens, return_hidden=True), atol=1e-5)
    # The merged tree is the explicit one, leaf by leaf; adapters are gone, untargeted leaves untouched.
    merged = lora.merge(adapted, settings.scale)
    assert optim.param_paths(merged) == optim.param_paths(base)
    for path, m, e in zip(optim.param_paths(merged), jax.tree.leaves(merged), jax.tree.leaves(explicit)):
        np.testing.assert_allclose(m, e, atol=1e-6, err_msg=path)
        assert m.dtype == e.dtype, path


def test_lora_adds_a_gaussian_a_and_a_zero_b_beside_exactly_the_targets():
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=64, tie_embeddings=False)
    base = gpt_init(cfg, jax.random.key(0))
    settings = lora.LoRA(rank=8, alpha=8.0, targets=(r"blocks_\d+/attn/qkv/kernel",))
    adapted = lora.add(base, settings, jax.random.key(1))
    added = sorted(set(optim.param_paths(adapted)) - set(optim.param_paths(base)))
    assert added == [f"blocks_{i}/attn/qkv/{n}" for i in (0, 1) for n in ("lora_a", "lora_b")]
    assert lora.has_adapters(adapted) and not lora.has_adapters(base)
    assert lora.is_adapter("blocks_0/attn/qkv/lora_a") and not lora.is_adapter("blocks_0/attn/qkv/kernel")
    assert lora.is_adapter("lora_b") and not lora.is_adapter("kernel") and not lora.is_adapter("lora_a/kernel")
    a0, a1 = (np.asarray(adapted[f"blocks_{i}"]["attn"]["qkv"]["lora_a"]) for i in (0, 1))
    b0 = np.asarray(adapted["blocks_0"]["attn"]["qkv"]["lora_b"])
    assert a0.shape == (64, 8) and b0.shape == (8, 3 * 64) and not b0.any()
    assert not np.allclose(a0, a1)  # each kernel draws its own A
    assert np.std(np.concatenate([a0.ravel(), a1.ravel()])) == pytest.approx(1 / math.sqrt(64), rel=0.15)
    assert abs(np.mean(a0)) < 0.05
    for path, x in zip(optim.param_paths(base), jax.tree.leaves(base)):
        np.testing.assert_array_equal(leaf(adapted, path), x)
    # Stacked (scanned) kernels get stacked adapters.
    stacked = lora.add({"blocks": {"fc": {"kernel": jnp.ones((3, 4, 5), jnp.bfloat16)}}},
                       lora.LoRA(2, 2.0, (r"blocks/fc/kernel",)), jax.random.key(0))
    assert stacked["blocks"]["fc"]["lora_a"].shape == (3, 4, 2) and stacked["blocks"]["fc"]["lora_b"].shape == (3, 2, 5)
    assert stacked["blocks"]["fc"]["lora_a"].dtype == stacked["blocks"]["fc"]["lora_b"].dtype == jnp.bfloat16


def test_lora_merge_keeps_the_kernels_dtype_and_reads_scale_from_a_run_config():
    params = {"fc": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3),
                     "lora_a": jnp.ones((2, 1), jnp.bfloat16), "lora_b": jnp.full((1, 3), 0.5, jnp.bfloat16)}}
    merged = lora.merge(params, 3.0)
    assert sorted(merged["fc"]) == ["bias", "kernel"] and merged["fc"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged["fc"]["kernel"], np.float32), np.full((2, 3), 2.5))
    settings = lora.LoRA.from_run({"finetune": {"lora_rank": "4", "lora_alpha": 6, "lora_targets": ["a", "b"]}})
    assert settings == lora.LoRA(4, 6.0, ("a", "b")) and settings.scale == 1.5
    for stored in ({"finetune": {"lora_rank": 4}}, {}, {"finetune": {"lora_rank": "x", "lora_alpha": 1,
                                                                   "lora_targets": []}}):
        with pytest.raises(UserError) as error:
            lora.LoRA.from_run(stored)
        assert str(error.value) == ("the checkpoint holds LoRA adapters but its config has no finetune.lora_rank/"
                                    "lora_alpha/lora_targets: it was not written by a gptlab LoRA fine-tuning run")
    with pytest.raises(UserError, match="rank of at least 1"):
        lora.LoRA(0, 1.0, ("x",))
    lora.LoRA(1, 1.0, ("x",))  # rank 1 is allowed


def test_lora_targets_must_match_kernels_only():
    base = gpt_init(TINY, jax.random.key(0))
    with pytest.raises(UserError) as error:
        lora.check_targets(base, ())
    assert str(error.value) == ("finetune.lora_targets is empty: give regexes over kernel paths, "
                                r"e.g. ('blocks_\d+/attn/(qkv|proj)/kernel',)")
    with pytest.raises(UserError, match="blocks_0/attn/qkv/bias, which is not the kernel"):
        lora.check_targets(base, (r"blocks_0/attn/qkv/.*",))
    with pytest.raises(UserError, match=r"^finetune.lora_targets: regex 'nothing/kernel' matches no parameter"):
        lora.check_targets(base, (r"nothing/kernel",))
    lora.check_targets(base, (r"blocks_0/attn/qkv/kernel",))


# -- the loss and its masks ----------------------------------------------------------------------


def test_lm_loss_is_the_weighted_sum_of_numpy_cross_entropies():
    params = gpt_init(TINY, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 0, TINY.vocab_size))
    weights = (np.arange(24).reshape(3, 8) % 3 != 0).astype(np.float32)  # some targets masked out
    model = GPT(TINY)
    loss_fn = steps_lib.lm_loss_fn(model)
    loss_sum, sums = loss_fn(params, {"tokens": tokens, "weights": weights}, None)
    logp = log_softmax(model.apply({"params": params}, tokens[:, :-1]))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    assert float(loss_sum) == pytest.approx((nll * weights).sum(), rel=1e-5)
    assert float(sums["count"]) == weights.sum() and float(sums["tokens"]) == 24
    # No weights: every target counts.
    loss_sum, sums = loss_fn(params, {"tokens": tokens}, None)
    assert float(loss_sum) == pytest.approx(nll.sum(), rel=1e-5) and float(sums["count"]) == 24
    # A dropout key turns dropout on (and only then).
    dropout = dataclasses.replace(TINY, dropout=0.5)
    off = steps_lib.lm_loss_fn(GPT(dropout))(params, {"tokens": tokens}, None)[0]
    on = steps_lib.lm_loss_fn(GPT(dropout))(params, {"tokens": tokens}, jax.random.key(0))[0]
    assert float(off) == pytest.approx(nll.sum(), rel=1e-5) and not np.isclose(float(on), float(off))


def test_sft_weights_cover_the_response_and_its_end_of_text_only():
    tokenizer = CharTokenizer("abcdefgh")
    tokens, weights = supervised.encode_sft(tokenizer, "abc", "de", seq_len=8)
    # ids: a=2 b=3 ... ; sequence a b c d e <eot>, then <eot> padding; targets are tokens[1:].
    np.testing.assert_array_equal(tokens, [2, 3, 4, 5, 6, 0, 0, 0, 0])
    np.testing.assert_array_equal(weights, [0, 0, 1, 1, 1, 0, 0, 0])  # targets d, e, <eot>
    # A response longer than the window is cut; its targets fill the rest of the window.
    tokens, weights = supervised.encode_sft(tokenizer, "ab", "cdefgh", seq_len=5)
    np.testing.assert_array_equal(tokens, [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(weights, [0, 1, 1, 1, 1])
    assert supervised.encode_sft(tokenizer, "abcdefg", "h", seq_len=8) is None  # 7 > 0.75 * 8 prompt tokens
    assert supervised.encode_sft(tokenizer, "abcdef", "h", seq_len=8) is not None  # 6 == 0.75 * 8 fits
    assert supervised.encode_sft(tokenizer, "", "h", seq_len=8) is None  # nothing to condition on
    assert tokens.dtype == np.int32 and weights.dtype == np.float32
    tokens, length = supervised.encode_classify(tokenizer, "abcdefgh", 5)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, [2, 3, 4, 5, 0])
    assert length == 5
    tokens, length = supervised.encode_classify(tokenizer, "ab", 5)
    np.testing.assert_array_equal(tokens, [2, 3, 0, 0, 0])
    assert length == 3


def test_classify_loss_accuracy_and_confusion_on_known_predictions():
    params = finetune.init_params(TINY, "classify", 3, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (6, 8), 0, TINY.vocab_size))
    lengths = np.array([8, 3, 5, 1, 8, 2])
    body = {k: v for k, v in params.items() if k != "cls_head"}
    hidden = np.asarray(GPT(TINY).apply({"params": body}, tokens, return_hidden=True), np.float64)
    last = hidden[np.arange(6), lengths - 1]
    # A head whose predictions we choose: class c for rows whose last hidden state is most like e_c.
    kernel = np.zeros((TINY.n_embd, 3), np.float32)
    kernel[0, 0], kernel[1, 1], kernel[2, 2] = 10.0, 10.0, 10.0
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    params = {**params, "cls_head": {"kernel": kernel, "bias": bias}}
    logits = last @ kernel + bias
    predicted = logits.argmax(-1)
    labels = np.array([predicted[0], predicted[1], (predicted[2] + 1) % 3, predicted[3], (predicted[4] + 2) % 3, 0])
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    loss_sum, sums = steps_lib.classify_loss_fn(GPT(TINY))(
        params, {"tokens": tokens, "lengths": lengths, "labels": labels, "weights": weights}, None)
    nll = -log_softmax(logits)[np.arange(6), labels]
    assert float(loss_sum) == pytest.approx((nll * weights).sum(), rel=1e-4)
    assert float(sums["count"]) == 5 and float(sums["accuracy"]) == 3 and float(sums["tokens"]) == 48
    confusion = np.zeros((3, 3))
    for t, p, w in zip(labels, predicted, weights):
        confusion[t, p] += w
    np.testing.assert_array_equal(np.asarray(sums["confusion"]), confusion)


def test_accuracy_macro_f1_and_perplexity_from_sums_on_known_predictions():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    predicted = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 1])
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (labels, predicted), 1)
    totals = {"loss_sum": 7.0, "count": 10.0, "tokens": 123.0, "accuracy": float((labels == predicted).sum()),
              "confusion": confusion}
    metrics = steps_lib.metrics_from_sums(totals, prefix="test")
    # Per class (tp, true, predicted): 0 (2, 3, 3), 1 (1, 2, 3), 2 (3, 4, 4), 3 (0, 1, 0).
    f1 = [2 * 2 / 6, 2 * 1 / 5, 2 * 3 / 8, 0.0]
    assert metrics == pytest.approx({"test_loss": 0.7, "test_perplexity": math.exp(0.7), "test_accuracy": 0.6,
                                     "test_macro_f1": sum(f1) / 4})
    assert metrics["test_macro_f1"] == pytest.approx(stats_macro_f1(labels, predicted))
    assert steps_lib.macro_f1(np.zeros((3, 3))) == 0.0
    assert steps_lib.metrics_from_sums({"loss_sum": 1e6, "count": 1.0})["eval_perplexity"] == math.exp(700.0)


def stats_macro_f1(labels, predicted) -> float:
    """Macro-F1 as the textbook defines it: per class precision and recall, their harmonic mean."""
    scores = []
    for c in sorted(set(labels) | set(predicted)):
        tp = np.sum((labels == c) & (predicted == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        scores.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


# -- evaluation: bits per byte, exact match, parse rate ------------------------------------------


def fake_loaded(tokenizer, seed=0, cfg=None):
    cfg = cfg or GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    return types.SimpleNamespace(model_cfg=cfg, params=gpt_init(cfg, jax.random.key(seed)), tokenizer=tokenizer,
                                 directory="fake")


def test_token_stream_spreads_each_documents_bytes_over_its_tokens():
    tokenizer = CharTokenizer("hé wrld")
    stream, num_bytes = evaluate.token_stream(["hé", "w é"], tokenizer)
    np.testing.assert_array_equal(stream, np.concatenate([tokenizer.encode("hé"), [0], tokenizer.encode("w é"), [0]]))
    np.testing.assert_allclose(num_bytes, [1.5, 1.5, 0, 4 / 3, 4 / 3, 4 / 3, 0])  # "hé": 3 bytes, "w é": 4
    stream, num_bytes = evaluate.token_stream(["", "h"], tokenizer)
    np.testing.assert_array_equal(stream, [0, tokenizer.encode("h")[0], 0])
    assert num_bytes.tolist() == [0, 1, 0]
    assert evaluate.token_stream([], tokenizer)[0].shape == (0,)
    windows, weights, target_index = evaluate.windows(np.arange(10), 4)
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(target_index[2], [9, 10, 11, 12])


def test_bits_per_byte_by_hand_on_a_short_text(monkeypatch):
    texts = ["héllo wörld", "ab", "wé"]
    tokenizer = CharTokenizer("".join(texts))
    loaded = fake_loaded(tokenizer)
    monkeypatch.setattr(pipeline, "prepare", lambda data_cfg: "builder")
    monkeypatch.setattr(pipeline, "read_texts", lambda builder, split, key: iter(texts))
    data_cfg = config_dict.ConfigDict({"seq_len": 6, "batch_size": 2, "eval_split": "validation", "text_key": "text",
                                       "dataset": "fake"})
    got = evaluate.lm_metrics(loaded, data_cfg, config_dict.ConfigDict({"num_batches": None}), log=lambda *_: None)
    # By hand: the stream, cut into windows of 6 targets; each target predicted from its window's start.
    stream, token_bytes = [], []
    for text in texts:
        ids = list(tokenizer.encode(text))
        stream += ids + [0]
        token_bytes += [len(text.encode("utf-8")) / len(ids)] * len(ids) + [0.0]
    nats = 0.0
    for t in range(1, len(stream)):
        start = (t - 1) // 6 * 6
        logits = GPT(loaded.model_cfg).apply({"params": loaded.params}, np.array([stream[start:t]]))
        nats -= log_softmax(logits[0, -1])[stream[t]]
    num_bytes = sum(token_bytes[1:])
    assert num_bytes == pytest.approx(sum(len(t.encode("utf-8")) for t in texts) - 13 / 11)  # first token: context
    assert got["tokens"] == len(stream) - 1 and got["bytes"] == round(num_bytes)
    assert got["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / (len(stream) - 1)), rel=1e-5)
    assert got["batches"] == 2 and got["seq_len"] == 6 and got["batch_size"] == 2
    # num_batches: only the first batch's windows (2 x 6 targets).
    first = evaluate.lm_metrics(loaded, data_cfg, config_dict.ConfigDict({"num_batches": 1}), log=lambda *_: None)
    assert first["tokens"] == 12 and first["batches"] == 1


def test_exact_match_and_parse_rate_on_crafted_completions(monkeypatch):
    examples = [
        {"prompt": "def f():\n", "response": "    return 1\n"},  # completed exactly (but for trailing space)
        {"prompt": "def g():\n", "response": "    return 2\n"},  # wrong answer, still Python
        {"prompt": "def h():\n", "response": "    return 3\n"},  # wrong and not Python
        {"prompt": "x = (\n", "response": "1)\n"},  # exact, and Python only with its prompt
        {"prompt": "def k():\n" * 5, "response": "    pass\n"},  # prompt too long for the window: skipped
    ]
    completions = {"def f():\n": "    return 1   \n\n", "def g():\n": "    return 22\n", "def h():\n": "    return (\n",
                   "x = (\n": "1)\n"}
    tokenizer = CharTokenizer("".join(e["prompt"] + e["response"] for e in examples))
    loaded = fake_loaded(tokenizer, cfg=GPTConfig(vocab_size=tokenizer.vocab_size, block_size=24, n_layer=1,
                                                   n_head=2, n_embd=16))
    def read(data_cfg, keys, seq_len, batch_size):
        assert (data_cfg.dataset, keys, seq_len, batch_size) == ("fake", ("prompt", "response"), 24, 3)
        return "builder", examples

    monkeypatch.setattr(evaluate, "_examples", read)
    budgets = []

    def generate(params, cfg, prompts, max_new_tokens, *, temperature, end_token):
        assert temperature == 0.0 and end_token == tokenizer.eot_id  # greedy, stopping at end-of-text
        budgets.append(max_new_tokens)
        return [tokenizer.encode(completions[tokenizer.decode(p)]) for p in prompts]

    monkeypatch.setattr(sampling, "generate", generate)
    data_cfg = config_dict.ConfigDict({"seq_len": 24, "batch_size": 3, "prompt_key": "prompt",
                                       "response_key": "response", "dataset": "fake"})
    got = evaluate.sft_metrics(loaded, data_cfg, config_dict.ConfigDict({"num_batches": None}), log=lambda *_: None)
    assert got["examples"] == 4 and got["exact_match"] == 0.5 and got["parse_rate"] == 0.75
    assert budgets == [24 - 9, 24 - 6]  # the window left after each batch's longest prompt
    # The loss covers exactly the response tokens and their end-of-text.
    assert got["response_tokens"] == sum(len(e["response"]) + 1 for e in examples[:4])
    first = evaluate.sft_metrics(loaded, data_cfg, config_dict.ConfigDict({"num_batches": 1}), log=lambda *_: None)
    assert first["examples"] == 3 and first["exact_match"] == pytest.approx(1 / 3)
    assert first["parse_rate"] == pytest.approx(2 / 3)
    assert evaluate.parses_as_python("x = 1\n") and not evaluate.parses_as_python("x = (\n")
    assert not evaluate.parses_as_python("\0")  # ast.parse raises ValueError on null bytes (older Pythons)


# -- strategy masks ------------------------------------------------------------------------------


def test_strategy_masks_by_hand_on_a_two_layer_model():
    params = gpt_init(GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=16, tie_embeddings=False),
                      jax.random.key(0))
    paths = optim.param_paths(params)

    def trains(strategy, **kwargs):
        mask = adapt.trainable_mask(params, strategy, 3, **kwargs)
        return {p for p, t in zip(paths, jax.tree.leaves(mask)) if t}

    assert trains("full") == set(paths)
    assert trains("head") == {"lm_head/kernel"}
    assert trains("last_k", last_k=1) == {p for p in paths if p.startswith(("blocks_2/", "ln_f/", "lm_head/"))}
    assert trains("last_k", last_k=3) == {p for p in paths if not p.startswith(("wte", "wpe"))}
    assert trains("bitfit") == {p for p in paths if p.endswith("/bias")}
    assert trains("layernorm") == {p for p in paths if "/ln_" in f"/{p}"}
    assert trains("regex", trainable=(r"wpe/.*",)) == {"wpe/embedding"}
    assert trains("head", trainable=(r"ln_f/scale",)) == {"lm_head/kernel", "ln_f/scale"}
    for strategy, kwargs, message in (("last_k", {"last_k": 0}, "1 <= last_k <= 3"),
                                      ("last_k", {"last_k": 4}, "1 <= last_k <= 3"),
                                      ("regex", {}, "needs finetune.trainable"), ("lora", {}, "no LoRA adapters"),
                                      ("nope", {}, "unknown finetune.strategy")):
        with pytest.raises(UserError, match=message):
            trains(strategy, **kwargs)
    # A task head replaces the LM head as "the head", and always trains.
    classify = finetune.init_params(TINY, "classify", 3, jax.random.key(0))
    cpaths = optim.param_paths(classify)
    mask = adapt.trainable_mask(classify, "head", 2)
    assert {p for p, t in zip(cpaths, jax.tree.leaves(mask)) if t} == {"cls_head/bias", "cls_head/kernel"}
    mask = adapt.trainable_mask(classify, "bitfit", 2)
    assert {p for p, t in zip(cpaths, jax.tree.leaves(mask)) if t} == (
        {p for p in cpaths if p.endswith("/bias")} | {"cls_head/kernel"})
    nobias = gpt_init(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False),
                      jax.random.key(0))
    with pytest.raises(UserError, match="has none"):
        adapt.trainable_mask(nobias, "bitfit", 2)
    scanned = gpt_init(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, scan_layers=True),
                       jax.random.key(0))
    with pytest.raises(UserError, match="scan_layers"):
        adapt.trainable_mask(scanned, "last_k", 2, last_k=1)


def test_frozen_parameters_get_no_update_and_trainable_ones_adamws():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    opt = config_dict.ConfigDict({"weight_decay": 0.0, "weight_decay_on": ("a",), "grad_clip_norm": 0.0,
                                  "b1": 0.9, "b2": 0.999, "eps": 1e-8})
    tx = adapt.optimizer(opt, lambda step: 0.1, params, {"a": True, "b": False})
    updates, _ = tx.update({"a": jnp.full(3, 2.0), "b": jnp.full(2, 2.0)}, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -0.1, rtol=1e-5)  # Adam's first step: -lr * sign(g)
    np.testing.assert_array_equal(updates["b"], 0.0)
    everything = adapt.optimizer(opt, lambda step: 0.1, params, {"a": True, "b": True})
    updates, _ = everything.update({"a": jnp.full(3, 2.0), "b": jnp.full(2, -2.0)}, everything.init(params), params)
    np.testing.assert_allclose(updates["b"], 0.1, rtol=1e-5)


def test_match_mask_uses_fullmatch_and_names_a_rule_that_matches_nothing():
    params = {"blocks_0": {"attn": {"kernel": 0, "bias": 0}}, "wte": {"embedding": 0}}
    mask = optim.match_mask(params, (r"blocks_\d+/attn/kernel",), "what")
    assert mask == {"blocks_0": {"attn": {"kernel": True, "bias": False}}, "wte": {"embedding": False}}
    with pytest.raises(UserError, match=r"what: regex 'attn/kernel' matches no parameter"):
        optim.match_mask(params, (r"attn/kernel",), "what")  # fullmatch, not search
    with pytest.raises(UserError, match="is not a valid regex"):
        optim.match_mask(params, (r"(",), "what")
    assert optim.param_paths(params) == ["blocks_0/attn/bias", "blocks_0/attn/kernel", "wte/embedding"]
    assert optim.path_str((jax.tree_util.SequenceKey(2), jax.tree_util.DictKey("x"))) == "2/x"


def test_lora_computes_what_peft_computes_on_the_same_weights():
    """PEFT (Hugging Face's LoRA) on transformers' GPT-2 with the same base weights, A, B, rank and alpha."""
    torch = needs("torch", "test-full")
    transformers = needs("transformers", "test-full")
    peft = needs("peft", "test-full")
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)  # GPT-2: tied head, biases
    settings = lora.LoRA(rank=2, alpha=5.0, targets=(r"blocks_\d+/attn/qkv/kernel", r"blocks_\d+/mlp/proj/kernel"))
    adapted = lora.add(gpt_init(cfg, jax.random.key(0)), settings, jax.random.key(1))
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(optim.path_str(p))), x.shape)
        if optim.path_str(p).endswith("lora_b") else x, adapted)
    base = jax.tree.map(lambda x: x, adapted)
    for i in range(cfg.n_layer):
        for module in (base[f"blocks_{i}"]["attn"]["qkv"], base[f"blocks_{i}"]["mlp"]["proj"]):
            del module["lora_a"], module["lora_b"]
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**convert.hf_config(cfg))).eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in convert.to_hf_tensors(base, cfg).items()}, strict=False)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5.0, target_modules=["c_attn", "mlp.c_proj"],
                                                    lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():
        for i in range(cfg.n_layer):
            layers = model.base_model.model.transformer.h[i]
            for module, ours in ((layers.attn.c_attn, adapted[f"blocks_{i}"]["attn"]["qkv"]),
                                 (layers.mlp.c_proj, adapted[f"blocks_{i}"]["mlp"]["proj"])):
                # PEFT's A is a Linear(in, r) (weight r x in), its B a Linear(r, out): ours transposed.
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ours["lora_a"]).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ours["lora_b"]).T.copy()))
                assert module.scaling["default"] == settings.scale
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size))
    with torch.no_grad():
        want = model(torch.from_numpy(tokens).long()).logits.numpy()
    got = lora.Adapted(GPT(cfg), settings.scale).apply({"params": adapted}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not np.allclose(got, GPT(cfg).apply({"params": base}, tokens), atol=1e-3)  # the adapters matter
