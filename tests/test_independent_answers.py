"""Every number a user publishes, checked against an answer computed here another way.

LoRA against the explicit W + (alpha / rank) A B; the loss and its masks against a
numpy log-softmax; accuracy, macro-F1 and the confusion matrix on known predictions;
bits per byte by hand on a short text; sft exact match and parse rate on crafted
completions; selection, early stopping and the study's statistics against hand
computation or scipy. These are the tests tools/mutation.sh scores.
"""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict
from scipy import stats

from gptlab import adapt, evaluate, finetune, lora, optim, report, sampling, selection, train, transfer
from gptlab import study as study_lib
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
    a0, a1 = (np.asarray(adapted[f"blocks_{i}"]["attn"]["qkv"]["lora_a"]) for i in (0, 1))
    b0 = np.asarray(adapted["blocks_0"]["attn"]["qkv"]["lora_b"])
    assert a0.shape == (64, 8) and b0.shape == (8, 3 * 64) and not b0.any()
    assert not np.allclose(a0, a1)  # each kernel draws its own A
    assert np.std(np.concatenate([a0.ravel(), a1.ravel()])) == pytest.approx(1 / math.sqrt(64), rel=0.15)
    assert abs(np.mean(a0)) < 0.05
    for path, x in zip(optim.param_paths(base), jax.tree.leaves(base)):
        np.testing.assert_array_equal(leaf(adapted, path), x)
    # Stacked (scanned) kernels get stacked adapters.
    stacked = lora.add({"blocks": {"fc": {"kernel": jnp.ones((3, 4, 5))}}},
                       lora.LoRA(2, 2.0, (r"blocks/fc/kernel",)), jax.random.key(0))
    assert stacked["blocks"]["fc"]["lora_a"].shape == (3, 4, 2) and stacked["blocks"]["fc"]["lora_b"].shape == (3, 2, 5)


def test_lora_merge_keeps_the_kernels_dtype_and_reads_scale_from_a_run_config():
    params = {"fc": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3),
                     "lora_a": jnp.ones((2, 1), jnp.bfloat16), "lora_b": jnp.full((1, 3), 0.5, jnp.bfloat16)}}
    merged = lora.merge(params, 3.0)
    assert sorted(merged["fc"]) == ["bias", "kernel"] and merged["fc"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged["fc"]["kernel"], np.float32), np.full((2, 3), 2.5))
    settings = lora.LoRA.from_run({"finetune": {"lora_rank": "4", "lora_alpha": 6, "lora_targets": ["a", "b"]}})
    assert settings == lora.LoRA(4, 6.0, ("a", "b")) and settings.scale == 1.5
    with pytest.raises(UserError, match="not written by a gptlab LoRA"):
        lora.LoRA.from_run({"finetune": {"lora_rank": 4}})
    with pytest.raises(UserError, match="rank of at least 1"):
        lora.LoRA(0, 1.0, ("x",))
    lora.LoRA(1, 1.0, ("x",))  # rank 1 is allowed


def test_lora_targets_must_match_kernels_only():
    base = gpt_init(TINY, jax.random.key(0))
    with pytest.raises(UserError, match="is empty"):
        lora.check_targets(base, ())
    with pytest.raises(UserError, match="blocks_0/attn/qkv/bias, which is not the kernel"):
        lora.check_targets(base, (r"blocks_0/attn/qkv/.*",))
    with pytest.raises(UserError, match="matches no parameter"):
        lora.check_targets(base, (r"nothing/kernel",))
    lora.check_targets(base, (r"blocks_0/attn/qkv/kernel",))


# -- the loss and its masks ----------------------------------------------------------------------


def test_lm_loss_is_the_weighted_sum_of_numpy_cross_entropies():
    params = gpt_init(TINY, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 0, TINY.vocab_size))
    weights = (np.arange(24).reshape(3, 8) % 3 != 0).astype(np.float32)  # some targets masked out
    model = GPT(TINY)
    loss_fn = train.lm_loss_fn(model)
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
    off = train.lm_loss_fn(GPT(dropout))(params, {"tokens": tokens}, None)[0]
    on = train.lm_loss_fn(GPT(dropout))(params, {"tokens": tokens}, jax.random.key(0))[0]
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
    tokens, length = supervised.encode_classify(tokenizer, "abcdefgh", 5)
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
    loss_sum, sums = finetune.classify_loss_fn(GPT(TINY))(
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
    metrics = train.metrics_from_sums(totals, prefix="test")
    # Per class (tp, true, predicted): 0 (2, 3, 3), 1 (1, 2, 3), 2 (3, 4, 4), 3 (0, 1, 0).
    f1 = [2 * 2 / 6, 2 * 1 / 5, 2 * 3 / 8, 0.0]
    assert metrics == pytest.approx({"test_loss": 0.7, "test_perplexity": math.exp(0.7), "test_accuracy": 0.6,
                                     "test_macro_f1": sum(f1) / 4})
    assert metrics["test_macro_f1"] == pytest.approx(stats_macro_f1(labels, predicted))
    assert train.macro_f1(np.zeros((3, 3))) == 0.0
    assert train.metrics_from_sums({"loss_sum": 1e6, "count": 1.0})["eval_perplexity"] == math.exp(700.0)


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
    monkeypatch.setattr(evaluate, "_examples", lambda data_cfg, keys, seq_len, batch_size: ("builder", examples))
    budgets = []

    def generate(params, cfg, prompts, max_new_tokens, *, temperature, end_token):
        assert temperature == 0.0 and end_token == tokenizer.eot_id  # greedy, stopping at end-of-text
        budgets.append(max_new_tokens)
        return [tokenizer.encode(completions[tokenizer.decode(p)]) for p in prompts]

    monkeypatch.setattr(sampling, "generate", generate)
    data_cfg = config_dict.ConfigDict({"seq_len": 24, "batch_size": 3, "prompt_key": "prompt",
                                       "response_key": "response"})
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


# -- selection and early stopping ----------------------------------------------------------------


def test_better_and_the_direction_of_each_metric():
    for metric in ("eval_accuracy", "eval_macro_f1", "exact_match", "parse_rate"):
        assert selection.higher_is_better(metric) and selection.mode(metric) == "max"
        assert selection.better(0.6, 0.5, metric) and not selection.better(0.5, 0.5, metric)
    for metric in ("eval_loss", "eval_perplexity"):
        assert not selection.higher_is_better(metric) and selection.mode(metric) == "min"
        assert selection.better(0.4, 0.5, metric) and not selection.better(0.5, 0.5, metric)
    assert selection.better(3.0, None, "eval_loss") and not selection.better(math.nan, None, "eval_loss")
    assert not selection.better(math.inf, None, "eval_loss")


def test_early_stopping_by_hand():
    stop = selection.EarlyStopping("eval_loss", patience=2)
    assert stop.update(10, {"eval_loss": 3.0, "eval_perplexity": np.float32(20.0), "note": "x"})
    assert (stop.best_value, stop.best_step, stop.best_metrics) == (3.0, 10, {"eval_loss": 3.0, "eval_perplexity": 20.0})
    assert not stop.update(20, {"eval_loss": 3.0}) and stop.evals_since_best == 1 and not stop.stopped
    assert stop.update(30, {"eval_loss": 2.5}) and stop.evals_since_best == 0 and stop.best_step == 30
    assert not stop.update(40, {"eval_loss": 2.6}) and not stop.stopped
    assert not stop.update(50, {"eval_loss": 2.7}) and stop.stopped and stop.best_step == 30
    saved = stop.to_json()
    assert saved == {"metric": "eval_loss", "patience": 2, "best_value": 2.5, "best_step": 30,
                     "best_metrics": {"eval_loss": 2.5}, "evals_since_best": 2, "stopped": True}
    resumed = selection.EarlyStopping.from_json(saved, "eval_loss", 5)
    assert resumed.patience == 5 and resumed.best_step == 30 and resumed.stopped
    with pytest.raises(UserError, match="selects on 'eval_loss' but train.selection_metric='eval_accuracy'"):
        selection.EarlyStopping.from_json(saved, "eval_accuracy", 2)
    never = selection.EarlyStopping("eval_accuracy", patience=0)
    assert never.update(1, {"eval_accuracy": 0.5})
    for step in range(2, 10):
        assert not never.update(step, {"eval_accuracy": 0.4})
    assert not never.stopped and never.evals_since_best == 8
    assert never.update(10, {"eval_accuracy": 0.6}) and never.best_value == 0.6
    with pytest.raises(UserError, match="not among this run's evaluation metrics"):
        never.update(11, {"eval_loss": 1.0})
    one = selection.EarlyStopping("eval_loss", patience=1)
    one.update(1, {"eval_loss": 1.0})
    assert not one.update(2, {"eval_loss": 1.0}) and one.stopped


def selection_config(task="lm", patience=0, metric="eval_loss", eval_every=10, num_steps=100, test_split=None):
    return config_dict.ConfigDict({
        "train": {"early_stopping_patience": patience, "selection_metric": metric, "eval_every": eval_every,
                  "num_steps": num_steps},
        "data": {"eval_split": "validation", "test_split": test_split},
        "finetune": {"task": task}})


def test_selection_settings_are_checked():
    selection.check_config(selection_config())
    selection.check_config(selection_config("classify", 3, "eval_macro_f1", test_split="test"))
    selection.check_config(selection_config(patience=1, eval_every=99, num_steps=100))
    selection.check_config(selection_config(patience=1, eval_every=10, num_steps=0))
    for kwargs, message in ((dict(patience=-1), "must be >= 0"),
                            (dict(metric="eval_accuracy"), "not produced by task 'lm'"),
                            (dict(task="sft", metric="exact_match"), "choose one of \\['eval_loss', 'eval_perplexity'\\]"),
                            (dict(patience=1, eval_every=100, num_steps=100), "needs evaluations before the end"),
                            (dict(test_split="validation"), "also data.eval_split")):
        with pytest.raises(UserError, match=message):
            selection.check_config(selection_config(**kwargs))
    assert selection.task_of(selection_config("classify")) == "classify"
    assert selection.task_of(config_dict.ConfigDict({"train": {}})) == "lm"
    assert selection.task_of(config_dict.ConfigDict({"finetune": {"task": ""}})) == "lm"


def test_report_chooses_the_best_mean_validation_value():
    def result(val):
        return {"selection": {"validation": {"eval_loss": val, "eval_accuracy": 1 - val}}}

    candidates = {1e-3: [result(2.0), result(2.2)], 3e-3: [result(2.05), result(2.05)], 1e-2: [{"eval_loss": None}]}
    assert report.choose(candidates, "eval_loss") == 3e-3  # mean 2.05 < 2.1
    assert report.choose(candidates, "eval_accuracy") == 3e-3
    assert report.choose({1: [{"eval_loss": 1.5}], 2: [result(1.6)]}, "eval_loss") == 1  # an older result: its final
    assert report.choose({1: [{}]}, "eval_loss") is None
    with pytest.raises(UserError, match="only ever reported"):
        report.choose(candidates, "test_loss")
    assert report.metric_value({"selection": {"test": {"test_loss": 1.5}}, "test_loss": 9}, "test_loss") == 1.5
    assert report.metric_value({"test_loss": 9}, "test_loss") is None
    assert report.metric_value({"eval_loss": 2}, "eval_loss") == 2
    assert report.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, float(np.std([1, 2, 4], ddof=1))))
    assert report.mean_std([2.0]) == (2.0, None) and report.mean_std([]) == (None, None)


# -- the study's statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_and_paired_difference_against_scipy(confidence):
    values = [2.31, 2.35, 2.29, 2.40, 2.33]
    interval = transfer.t_interval(values, confidence)
    low, high = stats.t.interval(confidence, df=4, loc=np.mean(values), scale=stats.sem(values))
    assert (interval.mean, interval.low, interval.high) == pytest.approx((np.mean(values), low, high), rel=1e-12)
    assert interval.n == 5 and interval.confidence == confidence
    assert interval.half_width == pytest.approx((high - low) / 2)
    assert interval.excludes(0.0) and interval.excludes(3.0) and not interval.excludes(2.33)
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 1.0, 7: 0.0}
    diff = transfer.paired_difference(a, b, confidence)
    expected = stats.ttest_rel([1.0, 2.0, 4.0], [0.5, 1.0, 1.0]).confidence_interval(confidence)
    assert (diff.low, diff.high, diff.mean, diff.n) == pytest.approx((expected.low, expected.high, 1.5, 3))
    with pytest.raises(ValueError, match="non-empty"):
        transfer.t_interval(np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        transfer.t_interval([1.0, math.inf])
    single = transfer.t_interval([4.0], confidence)
    assert (single.mean, single.low, single.high, single.n, single.confidence) == (4.0, -math.inf, math.inf, 1,
                                                                                   confidence)


def test_effective_data_by_hand_on_a_three_point_curve():
    d, loss = [1000.0, 4000.0, 16000.0], [4.0, 3.0, 2.0]
    point = transfer.effective_data(d, loss, 500.0, 2.5)
    # Between (4000, 3) and (16000, 2) in log-log: log D = log 4000 + frac * log 4, frac = log(3/2.5) / log(3/2).
    frac = math.log(3 / 2.5) / math.log(3 / 2)
    assert point.effective_tokens == pytest.approx(4000 * 4 ** frac, rel=1e-12)
    assert point.transferred_tokens == pytest.approx(4000 * 4 ** frac - 500, rel=1e-12)
    assert (point.fine_tuned_tokens, point.loss, point.censored, point.bound) == (500.0, 2.5, None, None)
    assert transfer.effective_data(d, loss, 500.0, 3.0).effective_tokens == 4000.0  # exactly a scratch point
    assert transfer.effective_data(d, loss, 500.0, 4.0).effective_tokens == 1000.0
    assert transfer.effective_data(d, loss, 500.0, 2.0).effective_tokens == 16000.0
    above = transfer.effective_data(d, loss, 500.0, 1.9)
    assert (above.censored, above.bound, above.effective_tokens, above.transferred_tokens) == ("above", 16000.0,
                                                                                               None, None)
    below = transfer.effective_data(d, loss, 500.0, 4.1)
    assert (below.censored, below.bound) == ("below", 1000.0)
    # Unsorted input, a rise (noise) read through the running minimum: its plateau's first point.
    d2, l2 = transfer.scratch_envelope([16000.0, 1000.0, 4000.0, 8000.0], [2.0, 4.0, 3.0, 3.5])
    assert d2.tolist() == [1000.0, 4000.0, 8000.0, 16000.0] and l2.tolist() == [4.0, 3.0, 3.0, 2.0]
    assert transfer.effective_data([16000.0, 1000.0, 4000.0, 8000.0], [2.0, 4.0, 3.0, 3.5], 1.0,
                                   3.0).effective_tokens == 4000.0
    for tokens, losses, message in (([1.0], [1.0], "at least two"), ([1.0, 2.0], [1.0], "at least two"),
                                    ([0.0, 2.0], [1.0, 1.0], "positive"), ([1.0, 2.0], [1.0, 0.0], "positive"),
                                    ([1.0, 1.0], [2.0, 1.0], "same token count")):
        with pytest.raises(ValueError, match=message):
            transfer.scratch_envelope(tokens, losses)


def test_transfer_fit_against_the_normal_equations_and_scipy_t():
    rng = np.random.default_rng(0)
    d_f = np.array([1e3, 3e3, 1e4, 3e4, 1e3, 3e3, 1e4, 3e4])
    n = np.array([1e5] * 4 + [1e6] * 4)
    d_t = 7.0 * d_f ** 0.6 * n ** 0.3 * np.exp(rng.normal(0, 0.1, 8))
    fit = transfer.fit_transfer_law(d_f, n, d_t, confidence=0.9)
    x = np.column_stack([np.ones(8), np.log(d_f), np.log(n)])
    y = np.log(d_t)
    coef = np.linalg.solve(x.T @ x, x.T @ y)
    residual = y - x @ coef
    cov = residual @ residual / 5 * np.linalg.inv(x.T @ x)
    se = np.sqrt(np.diag(cov))
    t = stats.t.ppf(0.95, 5)
    assert (fit.k, fit.alpha, fit.beta) == pytest.approx((math.exp(coef[0]), coef[1], coef[2]), rel=1e-9)
    assert (fit.alpha_se, fit.beta_se) == pytest.approx((se[1], se[2]), rel=1e-9)
    assert fit.alpha_interval == pytest.approx((coef[1] - t * se[1], coef[1] + t * se[1]), rel=1e-9)
    assert fit.beta_interval == pytest.approx((coef[2] - t * se[2], coef[2] + t * se[2]), rel=1e-9)
    r2 = 1 - residual @ residual / ((y - y.mean()) ** 2).sum()
    assert fit.n == 8 and fit.r_squared == pytest.approx(r2, rel=1e-9)
    assert fit.predict(2e3, 1e5) == pytest.approx(math.exp(coef[0]) * 2e3 ** coef[1] * 1e5 ** coef[2], rel=1e-9)
    with pytest.raises(ValueError, match="equal-length"):
        transfer.fit_transfer_law(d_f[:3], n, d_t)
    with pytest.raises(ValueError, match="at least 4 points"):
        transfer.fit_transfer_law(d_f[[0, 1, 4]], n[[0, 1, 4]], d_t[[0, 1, 4]])
    four = transfer.fit_transfer_law(d_f[[0, 1, 4, 5]], n[[0, 1, 4, 5]], d_t[[0, 1, 4, 5]])
    assert four.n == 4 and math.isfinite(four.alpha_interval[0])


def test_gain_share_and_pareto_by_hand():
    def choice(values, metric="test_acc"):
        return study_lib.Choice("s", 1.0, 1e-3, [{"seed": s, "test": {metric: v}, "validation": {}}
                                                 for s, v in values.items()])

    zero = choice({0: 0.2})
    share = study_lib.Study.gain_share(choice({0: 0.5, 1: 0.6, 2: 0.4, 3: 0.9}), choice({0: 0.8, 1: 0.7, 2: 0.6}), zero,
                                       "test_acc")
    expected = [(0.5 - 0.2) / (0.8 - 0.2), (0.6 - 0.2) / (0.7 - 0.2), (0.4 - 0.2) / (0.6 - 0.2)]
    assert share.n == 3 and share.mean == pytest.approx(np.mean(expected))
    assert share.low == pytest.approx(stats.t.interval(0.95, 2, np.mean(expected), stats.sem(expected))[0])
    # A seed where full fine-tuning gained nothing has no share; none at all: no interval.
    assert study_lib.Study.gain_share(choice({0: 0.5, 1: 0.6}), choice({0: 0.2, 1: 0.7}), zero, "test_acc").n == 1
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({0: 0.2}), zero, "test_acc") is None
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({1: 0.8}), zero, "test_acc") is None
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({0: 0.8}), None, "test_acc") is None
    values = choice({0: 0.5, 1: math.nan, 2: 0.7}).values("test_acc")
    assert values == {0: 0.5, 2: 0.7}
    assert study_lib.pareto({"a": (1, 3.0), "b": (2, 2.0), "c": (2, 2.0), "d": (3, 2.0), "e": (1, 3.5)}) == {"a", "b",
                                                                                                          "c"}
