"""Fine-tuning: strategy masks, the masked optimizer, LoRA, restoring from a pretrained run, tasks.

Unit tests use a small random "pretrained" model; the end-to-end tests pretrain the
`tiny` preset once per session and fine-tune from its checkpoint, as a user would.
"""
import dataclasses
import hashlib
import json
import gc
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, restore_state_numpy, tiny_config
from configs import finetune as finetune_config
from gptlab import adapt, convert, finetune, lora, optim, tokenizers, train
from gptlab import steps as steps_lib
from gptlab.data import supervised, task_corpora
from gptlab.errors import UserError
from gptlab.metrics import read_metrics
from gptlab.model import GPT, GPTConfig, init_params

TINY = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)
LORA = lora.LoRA(rank=4, alpha=16.0, targets=(r"blocks_\d+/attn/(qkv|proj)/kernel",))
STRATEGY_ARGS = {"last_k": dict(last_k=1), "regex": dict(trainable=(r"blocks_1/mlp/.*", r"ln_f/scale"))}


def paths_where(params, mask) -> set:
    return {p for p, m in zip(optim.param_paths(params), jax.tree.leaves(mask)) if m}


def make_params(cfg=TINY, task="lm", num_classes=3, seed=0, adapters=None):
    return jax.jit(lambda key: finetune.init_params(cfg, task, num_classes, key, adapters))(jax.random.key(seed))


def param_shapes(cfg=TINY, task="lm", num_classes=3, adapters=None):
    return jax.eval_shape(lambda: finetune.init_params(cfg, task, num_classes, jax.random.key(0), adapters))


def mask_for(params, strategy, cfg=TINY):
    kwargs = STRATEGY_ARGS.get(strategy, {})
    return adapt.trainable_mask(params, strategy, cfg.n_layer, kwargs.get("last_k", 2), kwargs.get("trainable", ()))


def adapters_for(strategy: str):
    return LORA if strategy == "lora" else None


def model_for(cfg: GPTConfig, strategy: str):
    """The model a strategy trains: LoRA's is the plain model applied to the merged parameter tree."""
    return lora.Adapted(GPT(cfg), LORA.scale) if strategy == "lora" else GPT(cfg)


# -- masks ---------------------------------------------------------------------------------------


def test_each_strategy_trains_exactly_its_parameters():
    plain = param_shapes()
    paths = set(optim.param_paths(plain))
    expected = {
        "full": paths,
        "head": {"lm_head/kernel"},
        "last_k": {p for p in paths if p.startswith(("blocks_1/", "ln_f/"))} | {"lm_head/kernel"},
        "bitfit": {p for p in paths if p.endswith("/bias")},
        "layernorm": {p for p in paths if "/ln_" in p or p.startswith("ln_f/")},
        "regex": {p for p in paths if p.startswith("blocks_1/mlp/")} | {"ln_f/scale"},
    }
    for strategy, wanted in expected.items():
        mask = mask_for(plain, strategy)
        assert jax.tree.structure(mask) == jax.tree.structure(plain)
        assert paths_where(plain, mask) == wanted, strategy
    adapted = param_shapes(adapters=LORA)
    assert paths_where(adapted, mask_for(adapted, "lora")) == {
        f"blocks_{i}/attn/{m}/lora_{ab}" for i in range(2) for m in ("qkv", "proj") for ab in "ab"}
    # Tied: the head is the token embedding. Classification: the new head always trains.
    tied = param_shapes(dataclasses.replace(TINY, tie_embeddings=True))
    assert paths_where(tied, mask_for(tied, "head")) == {"wte/embedding"}
    classify = param_shapes(task="classify")
    assert "lm_head/kernel" not in optim.param_paths(classify)
    assert paths_where(classify, mask_for(classify, "head")) == {"cls_head/kernel", "cls_head/bias"}
    for strategy in ("layernorm", "regex"):
        assert {"cls_head/kernel", "cls_head/bias"} <= paths_where(classify, mask_for(classify, strategy)), strategy


def test_bad_strategy_settings_are_one_line_user_errors():
    params = param_shapes()
    with pytest.raises(UserError, match="unknown finetune.strategy='adapters'"):
        adapt.trainable_mask(params, "adapters", 2)
    with pytest.raises(UserError, match=r"regex 'blocks_9/\.\*' matches no parameter"):
        adapt.trainable_mask(params, "regex", 2, trainable=("blocks_9/.*",))
    with pytest.raises(UserError, match=r"regex 'lm_hed/kernel' matches no parameter"):
        adapt.trainable_mask(params, "head", 2, trainable=("lm_hed/kernel",))
    with pytest.raises(UserError, match="finetune.last_k=3 does not fit the model's 2 layers"):
        adapt.trainable_mask(params, "last_k", 2, last_k=3)
    with pytest.raises(UserError, match="strategy=regex needs finetune.trainable"):
        adapt.trainable_mask(params, "regex", 2)
    with pytest.raises(UserError, match="model has no LoRA adapters"):
        adapt.trainable_mask(params, "lora", 2)
    with pytest.raises(UserError, match="has none \\(model.bias=False\\)"):
        adapt.trainable_mask(param_shapes(dataclasses.replace(TINY, bias=False)), "bitfit", 2)
    with pytest.raises(UserError, match="matches blocks_0/attn/qkv/bias, which is not the kernel"):
        lora.check_targets(params, (r"blocks_0/attn/qkv/.*",))
    with pytest.raises(UserError, match="finetune.lora_targets: regex 'attn/qkv' matches no parameter"):
        lora.check_targets(params, ("attn/qkv",))


# -- the masked optimizer --------------------------------------------------------------------------


def opt_config(weight_decay=0.1):
    opt = finetune_config.get_config("full,tiny").optimizer
    opt.weight_decay, opt.warmup_steps = weight_decay, 0
    return opt


# Llama-style: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.
LLAMA = dataclasses.replace(TINY, n_head=4, n_kv_head=2, bias=False, position="rope", norm="rmsnorm", mlp="swiglu")


def test_strategies_ask_the_model_so_they_hold_for_a_llama_style_model():
    params = param_shapes(LLAMA)
    paths = set(optim.param_paths(params))
    assert paths_where(params, mask_for(params, "head", LLAMA)) == {"lm_head/kernel"}
    assert paths_where(params, mask_for(params, "last_k", LLAMA)) == {
        p for p in paths if p.startswith(("blocks_1/", "ln_f/", "lm_head/"))}
    assert paths_where(params, mask_for(params, "layernorm", LLAMA)) == {
        "blocks_0/ln_1/scale", "blocks_0/ln_2/scale", "blocks_1/ln_1/scale", "blocks_1/ln_2/scale", "ln_f/scale"}
    with pytest.raises(UserError, match="bitfit trains biases, but this model has none"):
        mask_for(params, "bitfit", LLAMA)
    scanned = param_shapes(dataclasses.replace(LLAMA, scan_layers=True))
    with pytest.raises(UserError, match="last_k selects blocks, but model.scan_layers=True"):
        mask_for(scanned, "last_k", LLAMA)
    assert paths_where(scanned, mask_for(scanned, "head", LLAMA)) == {"lm_head/kernel"}


@pytest.mark.parametrize("strategy,task,cfg", [(s, "lm", TINY) for s in adapt.STRATEGIES] + [("bitfit", "classify", TINY)]
                         + [(s, "lm", LLAMA) for s in adapt.STRATEGIES if s != "bitfit"] + [("lora", "classify", LLAMA)],
                         ids=lambda x: "llama" if x is LLAMA else ("gpt2" if x is TINY else None))
def test_frozen_leaves_stay_bit_identical_and_trainable_ones_move(strategy, task, cfg):
    params = make_params(cfg, task, adapters=adapters_for(strategy))
    # A "pretrained" model: nonzero biases and LoRA B, so moving any of them would show.
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda p: p + np.float32(0.01) * rng.standard_normal(p.shape, np.float32), params)
    mask = mask_for(params, strategy, cfg)
    schedule = optax.constant_schedule(1e-2)
    tx = adapt.optimizer(opt_config(weight_decay=0.5), schedule, params, mask)
    model = model_for(cfg, strategy)
    loss_fn = steps_lib.classify_loss_fn(model) if task == "classify" else steps_lib.lm_loss_fn(model)
    trainable = None if all(jax.tree.leaves(mask)) else mask
    accumulate = 2 if strategy == "lora" or task == "classify" else 1  # the scan path, where it matters most
    step = jax.jit(steps_lib.make_train_step(loss_fn, tx, schedule, grad_accum_steps=accumulate, trainable=trainable))
    state = steps_lib.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))
    tokens = jax.random.randint(jax.random.key(2), (8, 17), 0, cfg.vocab_size)
    if task == "classify":
        batch = {"tokens": tokens[:, :16], "lengths": jnp.arange(8) + 9, "labels": jnp.arange(8) % 3,
                 "weights": jnp.ones(8)}
    else:
        batch = {"tokens": tokens}
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["train_loss"])
    for path, before, after, trains in zip(optim.param_paths(params), jax.tree.leaves(params),
                                           jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        if trains:
            assert not np.array_equal(before, after), f"{path} should have moved"
        else:  # bit for bit, despite weight decay 0.5 on every kernel
            np.testing.assert_array_equal(np.asarray(before).view(np.uint32), np.asarray(after).view(np.uint32),
                                          err_msg=path)


def test_optimizer_state_holds_moments_only_for_trainable_parameters():
    preset = GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)  # the `tiny` preset
    schedule = optax.constant_schedule(1e-3)
    state_bytes = {}
    for strategy, task in [("full", "lm"), ("head", "classify"), ("head", "lm"), ("last_k", "lm"),
                           ("bitfit", "lm"), ("layernorm", "lm"), ("lora", "lm")]:
        cfg = dataclasses.replace(preset, tie_embeddings=strategy != "head")
        params = param_shapes(cfg, task, num_classes=8, adapters=adapters_for(strategy))
        mask = mask_for(params, strategy, cfg)
        opt_state = jax.eval_shape(adapt.optimizer(opt_config(), schedule, params, mask).init, params)
        trainable = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
        state_bytes[strategy, task] = optim.state_bytes(opt_state)
        # Adam's two float32 moments per trainable parameter, plus step counters (a few bytes).
        assert 0 < state_bytes[strategy, task] - 2 * 4 * trainable <= 16, (strategy, task)
    full = state_bytes["full", "lm"]
    assert state_bytes["head", "classify"] < 0.05 * full  # a linear probe: 520 parameters
    assert state_bytes["lora", "lm"] < 0.1 * full
    assert state_bytes["head", "lm"] < 0.15 * full  # the untied LM head is 16k of the tiny model's 137k


# -- LoRA ------------------------------------------------------------------------------------------


def test_lora_starts_equal_and_its_merged_export_reproduces_the_adapted_model():
    base = make_params(seed=0)
    adapted = make_params(seed=1, adapters=LORA)
    adapted = jax.tree_util.tree_map_with_path(
        lambda path, x: x if optim.path_str(path).split("/")[-1].startswith("lora_") else
        base_leaf(base, optim.path_str(path)), adapted)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, TINY.vocab_size)
    logits = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, tokens))(p)
    plain, lora_model = GPT(TINY), model_for(TINY, "lora")
    np.testing.assert_array_equal(logits(plain, base), logits(lora_model, adapted))  # B = 0: exactly the base model
    # After training, B is nonzero: the merged plain model computes what the adapted one does.
    trained = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape)
        if optim.path_str(path).endswith("lora_b") else x, adapted)
    assert not np.allclose(logits(lora_model, trained), logits(plain, base), atol=1e-3)
    merged = lora.merge(trained, LORA.scale)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(logits(plain, merged), logits(lora_model, trained), atol=2e-5, rtol=1e-5)


def base_leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# -- restoring -------------------------------------------------------------------------------------


def test_restore_plan_names_what_is_loaded_added_and_refused():
    shapes = lambda params: {p: tuple(x.shape) for p, x in zip(optim.param_paths(params), jax.tree.leaves(params))}
    tied = shapes(param_shapes(dataclasses.replace(TINY, tie_embeddings=True)))
    plan = finetune.plan_restore(tied, shapes(param_shapes(adapters=LORA)), "lm", "ckpt")
    assert plan.untied == ["lm_head/kernel"] and set(plan.loaded) == set(tied)
    assert len(plan.initialised) == 8 and all(p.endswith(("lora_a", "lora_b")) for p in plan.initialised)
    plan = finetune.plan_restore(shapes(param_shapes()), shapes(param_shapes(task="classify")), "classify", "ckpt")
    assert plan.left_out == ["lm_head/kernel"] and plan.initialised == ["cls_head/bias", "cls_head/kernel"]
    wider = shapes(param_shapes(dataclasses.replace(TINY, n_embd=64)))
    with pytest.raises(UserError, match=r"ckpt does not fit the fine-tuning model: parameter \S+ has shape"):
        finetune.plan_restore(tied, wider, "lm", "ckpt")
    with pytest.raises(UserError, match="holds LoRA adapter .* use the merged export"):
        finetune.plan_restore(shapes(param_shapes(adapters=LORA)), shapes(param_shapes()), "lm", "ckpt")
    deeper = shapes(param_shapes(dataclasses.replace(TINY, n_layer=3)))
    with pytest.raises(UserError, match="has parameter blocks_2/.* which the fine-tuning model lacks"):
        finetune.plan_restore(deeper, shapes(param_shapes()), "lm", "ckpt")


# -- task data -------------------------------------------------------------------------------------


def test_sft_loss_weights_cover_exactly_the_response():
    tok = tokenizers.ByteTokenizer()
    tokens, weights = supervised.encode_sft(tok, "def f():\n", "    return 1\n", seq_len=32)
    prompt, response = 9, 13
    assert tokens[:prompt + response].tolist() == list(b"def f():\n    return 1\n")
    assert tokens[prompt + response] == tok.eot_id
    targets = tokens[1:]
    assert weights.sum() == response + 1  # the response and the closing end-of-text
    assert bytes(targets[weights == 1][:-1].tolist()) == b"    return 1\n" and targets[weights == 1][-1] == tok.eot_id
    truncated, weights = supervised.encode_sft(tok, "def f():\n", "x" * 100, seq_len=32)
    assert len(truncated) == 33 and weights[8:].all() and not weights[:8].any()
    assert supervised.encode_sft(tok, "p" * 25, "r", seq_len=32) is None  # prompt over 3/4 of the window


def test_stdlib_task_corpora_parse_functions_and_snippets():
    source = 'import os\n\nclass A:\n    def f(self, x):\n        """Add one.\n\n        More.\n        """\n' \
             '        y = x + 1\n        return y\n\n    def g(self):\n        return 2\n'
    [(line, prompt, response)] = list(task_corpora.documented_functions(source))
    assert line == 4 and prompt == 'def f(self, x):\n    """Add one."""\n'
    assert response == "    y = x + 1\n    return y\n"
    text = "\n".join(["a" * 40] * 10) + "\n\n" + "b" * 70 + "\n\nshort\n"
    cuts = list(task_corpora.snippets(text))
    assert [c[0] for c in cuts] == [1, 7, 12] and all(len(c[1]) <= task_corpora.SNIPPET_CHARS for c in cuts)


def test_example_batches_resume_and_eval_padding_counts_nowhere():
    arrays = {"tokens": np.arange(50)[:, None] * np.ones((1, 4), np.int32), "weights": np.ones((50, 3), np.float32)}
    a = supervised.ExampleBatches(arrays, batch_size=8, seed=0)
    seen = [next(a)["tokens"][:, 0] for _ in range(12)]  # crosses an epoch
    assert sorted(np.concatenate(seen[:6]).tolist()) == sorted(set(np.concatenate(seen[:6]).tolist()))
    b = supervised.ExampleBatches(arrays, batch_size=8, seed=0)
    b.restore(json.loads(json.dumps({**a.state(), "position": 8 * 7})))
    np.testing.assert_array_equal(next(b)["tokens"][:, 0], seen[7])
    evals = supervised.fixed_batches(arrays, batch_size=8, num_batches=10, seed=0)
    assert len(evals) == 7 and sum(float(e["weights"].sum()) for e in evals) == 50 * 3


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, data_dir):
    """A tiny pretraining run with one checkpoint, shared by the end-to-end tests."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(data_dir, train__num_steps=8, train__checkpoint_every=8, train__eval_every=8,
                         train__eval_batches=1)
    train.train_and_evaluate(config, workdir)
    return workdir


def ft_config(data_dir, init_from, preset="lora,tiny", **overrides):
    config = finetune_config.get_config(preset)
    config.data.data_dir = data_dir
    config.checkpoint.async_save = False
    config.finetune.init_from = str(init_from)
    config.train.num_steps, config.train.eval_batches, config.train.log_every = 4, 1, 2
    config.train.eval_every = config.train.checkpoint_every = 4
    for dotted, value in overrides.items():
        group, field = dotted.split("__")
        setattr(config[group], field, value)
    return config


def fingerprint(directory) -> dict:
    """Every folder under `directory`, and every file with its size, mtime and content hash."""
    out = {}
    for root, dirs, files in os.walk(directory):
        out.update({os.path.join(root, name): "dir" for name in dirs})
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (os.path.getsize(path), os.path.getmtime(path), hashlib.sha256(f.read()).hexdigest())
    return out


# End to end, LoRA in the quick suite and every strategy in CI (the unit tests above cover each mask).
@pytest.mark.parametrize("strategy", [pytest.param(s, marks=() if s == "lora" else pytest.mark.slow)
                                      for s in adapt.STRATEGIES])
def test_every_strategy_finetunes_a_pretrained_tiny_run(strategy, pretrained, data_dir, tmp_path):
    before = fingerprint(pretrained)
    overrides = {"finetune__trainable": (r"blocks_1/.*",)} if strategy == "regex" else {}
    final = finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, f"{strategy},tiny", **overrides), tmp_path)
    assert final["step"] == 4 and np.isfinite(final["eval_loss"])
    assert json.loads((tmp_path / "result.json").read_text())["eval_loss"] == final["eval_loss"]
    table = json.loads((tmp_path / "trainable.json").read_text())
    assert table["trainable_params"] + table["frozen_params"] == table["total_params"]
    assert (table["trainable_percent"] == 100.0) == (strategy == "full")
    restore = json.loads((tmp_path / "restore.json").read_text())
    assert restore["step"] == 8 and "blocks_0/attn/qkv/kernel" in restore["loaded"]
    # Frozen parameters are exactly the pretrained ones after fine-tuning.
    start, end = restore_state_numpy(pretrained, 8)["params"], restore_state_numpy(tmp_path, 4)["params"]
    for path in set(restore["loaded"]) - set(table["trainable"]):
        np.testing.assert_array_equal(base_leaf(start, path), base_leaf(end, path), err_msg=path)
    assert fingerprint(pretrained) == before  # init_from is never written to


def test_lora_run_exports_a_merged_plain_checkpoint_that_init_from_accepts(pretrained, data_dir, tmp_path):
    finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "lora,tiny"), tmp_path / "lora")
    adapted = restore_state_numpy(tmp_path / "lora", 4)["params"]
    merged = restore_state_numpy(tmp_path / "lora" / "merged", 4)["params"]
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    cfg = GPTConfig.from_config(config["model"])
    assert not any("lora" in p for p in optim.param_paths(merged))
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)
    np.testing.assert_allclose(GPT(cfg).apply({"params": merged}, tokens),
                               lora.Adapted(GPT(cfg), 16.0 / 8).apply({"params": adapted}, tokens), atol=2e-5, rtol=1e-5)
    final = finetune.finetune_and_evaluate(
        ft_config(data_dir, tmp_path / "lora" / "merged", "full,tiny", train__num_steps=0), tmp_path / "eval")
    assert final["step"] == 0 and np.isfinite(final["eval_loss"])  # num_steps=0: evaluation only
    # Trained on, the run replaces its merged export with the new step's.
    finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "lora,tiny", train__num_steps=6), tmp_path / "lora")
    assert convert.checkpoint_steps(tmp_path / "lora" / "merged" / "checkpoints") == [6]


def test_classify_restores_the_body_exactly_and_initialises_a_new_head(pretrained, data_dir, tmp_path, capsys):
    final = finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "head,classify,tiny"), tmp_path)
    assert 0.0 <= final["eval_accuracy"] <= 1.0 and np.isfinite(final["eval_loss"])
    restore = json.loads((tmp_path / "restore.json").read_text())
    assert restore["initialised"] == ["cls_head/bias", "cls_head/kernel"] and restore["left_out"] == []
    start, end = restore_state_numpy(pretrained, 8)["params"], restore_state_numpy(tmp_path, 4)["params"]
    assert set(optim.param_paths(end)) == set(optim.param_paths(start)) | {"cls_head/bias", "cls_head/kernel"}
    for path in optim.param_paths(start):
        np.testing.assert_array_equal(base_leaf(start, path), base_leaf(end, path), err_msg=path)
    assert end["cls_head"]["kernel"].shape == (64, len(finetune_config.PACKAGES))
    log = capsys.readouterr().out
    assert "initialised fresh: cls_head/bias, cls_head/kernel" in log and "loaded 28 parameter arrays" in log


def test_head_preset_unties_the_head_and_starts_it_as_the_embedding_transposed(pretrained, data_dir, tmp_path):
    final = finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "head,tiny", train__num_steps=0), tmp_path)
    start, untied = restore_state_numpy(pretrained, 8)["params"], restore_state_numpy(tmp_path, 0)["params"]
    assert "lm_head" not in start  # the tiny preset ties its head to wte
    np.testing.assert_array_equal(untied["lm_head"]["kernel"], start["wte"]["embedding"].T)
    np.testing.assert_array_equal(untied["wte"]["embedding"], start["wte"]["embedding"])
    assert json.loads((tmp_path / "restore.json").read_text())["untied"] == ["lm_head/kernel"]
    # The same model, so the same loss as the pretrained run on the same batches.
    config = json.loads((pretrained / "config.json").read_text())
    cfg = GPTConfig.from_config(config["model"])
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.vocab_size)
    untied_cfg = dataclasses.replace(cfg, tie_embeddings=False)
    np.testing.assert_allclose(GPT(untied_cfg).apply({"params": untied}, tokens), GPT(cfg).apply({"params": start}, tokens),
                               atol=1e-5, rtol=1e-5)
    assert final["step"] == 0


def test_sft_learns_responses_from_the_stdlib_functions(pretrained, data_dir, tmp_path):
    config = ft_config(data_dir, pretrained, "full,sft,tiny", train__num_steps=8, train__eval_every=8,
                       train__checkpoint_every=8, optimizer__warmup_steps=0, optimizer__learning_rate=3e-3)
    final = finetune.finetune_and_evaluate(config, tmp_path)
    assert np.isfinite(final["eval_loss"]) and final["step"] == 8
    # Learned: the response loss on held-out examples falls well below the untouched model's (4.26 -> 3.58 here).
    metrics = read_metrics(tmp_path)
    assert metrics[0]["step"] == 0 and final["eval_loss"] < 0.9 * metrics[0]["eval_loss"], metrics
    train_losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert train_losses[-1] < 0.9 * train_losses[0], train_losses


@pytest.mark.slow
def test_interrupted_finetuning_resumes_bit_identically(pretrained, data_dir, tmp_path):
    config = lambda steps: ft_config(data_dir, pretrained, "last_k,tiny", train__num_steps=steps,
                                     train__checkpoint_every=3, train__log_every=1, model__dropout=0.1,
                                     optimizer__decay_steps=6)
    finetune.finetune_and_evaluate(config(6), tmp_path / "straight")
    finetune.finetune_and_evaluate(config(3), tmp_path / "resumed")
    finetune.finetune_and_evaluate(config(6), tmp_path / "resumed")  # resumes its own step 3, not init_from
    straight, resumed = [read_metrics(tmp_path / d) for d in ("straight", "resumed")]
    assert straight[0] == resumed[0] and "train_loss" not in resumed[0]  # step 0: the untouched model, evaluated
    straight, resumed = [[m["train_loss"] for m in metrics if "train_loss" in m] for metrics in (straight, resumed)]
    assert len(resumed) == 6 and straight == resumed
    for a, b in zip(jax.tree.leaves(restore_state_numpy(tmp_path / "straight", 6)),
                    jax.tree.leaves(restore_state_numpy(tmp_path / "resumed", 6))):
        np.testing.assert_array_equal(a, b)


def test_bad_fine_tuning_input_is_refused_and_leaves_the_checkpoint_alone(pretrained, data_dir, tmp_path):
    before = fingerprint(pretrained)
    cases = [
        (dict(finetune__init_from=str(tmp_path / "nowhere")), "does not exist"),
        (dict(finetune__init_from=str(REPO / "configs")), "is not a gptlab checkpoint"),
        (dict(finetune__init_from=str(pretrained / "checkpoints" / "3")), "does not exist"),
        (dict(model__n_embd=96), r"parameter \S+ has shape \(64,\) there but \(96,\) here"),
        (dict(finetune__strategy="adapters"), "unknown finetune.strategy='adapters'"),
        (dict(finetune__strategy="last_k", finetune__last_k=5), "last_k=5 does not fit the model's 2 layers"),
        (dict(finetune__trainable=("blocks_7/.*",)), r"regex 'blocks_7/\.\*' matches no parameter"),
        (dict(data__tokenizer="char"), "differs from the pretrained run's byte tokenizer"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, **overrides), tmp_path / "ft")
    with pytest.raises(UserError, match="inside the pretraining run"):
        finetune.finetune_and_evaluate(ft_config(data_dir, pretrained), pretrained / "ft")
    assert fingerprint(pretrained) == before and not (pretrained / "ft").exists()


def test_the_untouched_pretrained_model_stays_the_best_when_fine_tuning_only_hurts(pretrained, data_dir, tmp_path):
    # A learning rate this large wrecks the model at the first update: every trained step is worse on validation.
    hurt = dict(optimizer__learning_rate=30.0, optimizer__warmup_steps=1, train__eval_every=2,
                train__checkpoint_every=2, train__early_stopping_patience=2)
    record = finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "full,tiny", **hurt),
                                            tmp_path / "ft")["selection"]
    assert record["best_step"] == 0 and record["stopped_early"]  # stopped at step 4, kept step 0
    untouched = finetune.finetune_and_evaluate(
        ft_config(data_dir, pretrained, "full,tiny", train__num_steps=0), tmp_path / "zero")["selection"]
    assert record["test"] == untouched["test"]  # the best checkpoint scores exactly as the untouched model
    without = finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "full,tiny", train__eval_at_start=False,
                                                       **hurt), tmp_path / "without")["selection"]
    assert without["best_step"] == 2 and without["test"]["test_loss"] > record["test"]["test_loss"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_pretrained_checkpoint_is_refused_in_one_line(pretrained, data_dir, tmp_path):
    copy = tmp_path / "pretrained"
    shutil.copytree(pretrained, copy)
    step_dir = max((copy / "checkpoints").iterdir(), key=lambda p: int(p.name))
    # Every byte of every array file changes: which file, and where in it, the parameters were written
    # depends on the order of Orbax's parallel writes, so damaging one spot would miss them now and then.
    for array_file in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
        array_file.write_bytes(bytes(byte ^ 0x5A for byte in array_file.read_bytes()))
    with pytest.raises(UserError, match=r"init_from checkpoint .* (is damaged|cannot be read)"):
        finetune.finetune_and_evaluate(ft_config(data_dir, copy, "full,tiny"), tmp_path / "ft")
    gc.collect()  # Orbax's reads abandoned by the failure print no traceback when collected (the marker above)


@pytest.mark.slow
def test_entry_point_runs_and_reports_bad_input_in_one_line(pretrained, data_dir, tmp_path):
    def run(preset, *args):
        cmd = [sys.executable, "-m", "experiments.finetune", f"--config=configs/finetune.py:{preset}",
               f"--config.data.data_dir={data_dir}", *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})

    result = run("bitfit,tiny", f"--workdir={tmp_path / 'ft'}",
                 f"--config.finetune.init_from={pretrained / 'checkpoints' / '8'}", "--config.train.num_steps=2")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["step"] == 2
    assert "trainable" in result.stdout and "initialised fresh" not in result.stdout
    result = run("lora,tiny", f"--workdir={tmp_path / 'bad'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: finetune.init_from is not set")


# -- breadth: the pretraining corpus before and after -------------------------------------------------


@pytest.mark.parametrize("preset", ["lora,tiny", "head,classify,tiny"])
def test_breadth_equals_experiments_evaluate_of_the_pretrained_run_and_the_best_checkpoint(
        preset, pretrained, data_dir, tmp_path):
    from configs import evaluate as evaluate_config
    from gptlab import evaluate

    source = tmp_path / "pretrained"  # a copy: evaluate writes eval.json into the workdir it scores
    shutil.copytree(pretrained, source)
    config = ft_config(data_dir, source, preset, finetune__breadth=True, finetune__breadth_batches=3)
    finetune.finetune_and_evaluate(config, tmp_path / "ft")
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    breadth = result["breadth"]
    pretrain_data = json.loads((source / "config.json").read_text())["data"]
    assert (breadth["dataset"], breadth["split"]) == (pretrain_data["dataset"], "validation")
    assert set(breadth["before"]) >= {"loss", "bits_per_byte"} and set(breadth["after"]) >= {"loss", "bits_per_byte"}

    def scored(workdir, step, data=None):
        eval_cfg = evaluate_config.get_config()
        with eval_cfg.unlocked():
            eval_cfg.num_batches = 3
            for key, value in (data or {}).items():
                eval_cfg.data[key] = tuple(value) if isinstance(value, list) else value
        return evaluate.evaluate(workdir, eval_cfg, step)

    # before: the pretrained run's own evaluation of its validation split (experiments.evaluate --workdir=PRETRAINED)
    own = scored(source, 8)
    assert breadth["tokens"] == own["tokens"]
    assert breadth["before"]["loss"] == pytest.approx(own["loss"], rel=1e-6, abs=0)
    assert breadth["before"]["bits_per_byte"] == pytest.approx(own["bits_per_byte"], rel=1e-6, abs=0)
    best = result["selection"]["best_step"]
    corpus = {k: pretrain_data[k] for k in ("dataset", "include", "exclude", "seq_len", "batch_size", "text_key")}
    if "classify" in preset:  # experiments.evaluate scores a classifier as one: the library's lm_metrics, as breadth does
        loaded = finetune.language_model(convert.load_workdir(tmp_path / "ft", best, strict=False),
                                         convert.load_workdir(source, 8, strict=False))
        eval_cfg = evaluate_config.get_config()
        with eval_cfg.unlocked():
            eval_cfg.num_batches = 3
        after = evaluate.lm_metrics(loaded, evaluate.data_config(json.loads((source / "config.json").read_text()),
                                                                 {}), eval_cfg)
        # only cls_head trained: the language model is the pretrained one
        assert breadth["after"]["loss"] == pytest.approx(breadth["before"]["loss"], rel=1e-6, abs=0)
    else:  # experiments.evaluate of the best checkpoint on the pretraining corpus's validation split
        after = scored(tmp_path / "ft", best, corpus)
        assert after["dataset"] == pretrain_data["dataset"] and after["step"] == best
        assert breadth["after"]["loss"] != breadth["before"]["loss"]  # the adapters moved it
    print(f"breadth {preset}: {breadth}; evaluate: before {own['loss']} {own['bits_per_byte']}, "
          f"after {after['loss']} {after['bits_per_byte']}")
    assert breadth["after"]["loss"] == pytest.approx(after["loss"], rel=1e-6, abs=0)
    assert breadth["after"]["bits_per_byte"] == pytest.approx(after["bits_per_byte"], rel=1e-6, abs=0)


# -- the test split: how much of it the best checkpoint is scored on ----------------------------------


def test_whole_test_split_is_scored_and_its_examples_counted(pretrained, data_dir, tmp_path):
    # train.test_batches=-1: every test example once (the study's classify scored 256 of 1,583 before)
    finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "head,classify,tiny", train__test_batches=-1),
                                   tmp_path / "whole")
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["data_examples"]["test"] > 8  # more than the one default batch below
    assert result["selection"]["test_examples"] == result["data_examples"]["test"]
    # unset: as many batches as validation's (one here): one batch of examples, the count says so
    finetune.finetune_and_evaluate(ft_config(data_dir, pretrained, "head,classify,tiny"), tmp_path / "default")
    default = json.loads((tmp_path / "default" / "result.json").read_text())
    batch = default["config"]["data"]["batch_size"]
    assert default["selection"]["test_examples"] == min(batch, default["data_examples"]["test"])
