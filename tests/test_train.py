import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptlab import checkpoint as checkpoint_lib
from gptlab import optim, train
from gptlab import steps as steps_lib
from gptlab.errors import UserError
from gptlab.metrics import read_metrics
from gptlab.model import GPT, GPTConfig, init_params

from conftest import restore_state_numpy

TINY = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_loss_falls_on_the_tiny_preset(make_config, tmp_path):
    final = train.train_and_evaluate(make_config(), tmp_path)
    metrics = read_metrics(tmp_path)
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] - 1.5, losses
    assert final["eval_loss"] < 3.5 and final["step"] == 40
    assert {"step", "train_loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= set(metrics[0])
    assert [m["step"] for m in metrics if "eval_loss" in m] == [20, 40]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
    assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())


def test_weight_decay_touches_only_matrices(make_config):
    params = init_params(TINY, jax.random.key(0))
    opt_cfg = make_config(optimizer__weight_decay=0.5, optimizer__warmup_steps=0).optimizer
    tx = optim.adamw(opt_cfg, optax.constant_schedule(0.1), params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    for path, before, after in zip(optim.param_paths(params), jax.tree.leaves(params), jax.tree.leaves(moved)):
        if path.endswith("/kernel"):
            np.testing.assert_allclose(after, before * (1 - 0.1 * 0.5), rtol=1e-6)
        else:  # biases, LayerNorm scales, token and position embeddings
            np.testing.assert_array_equal(after, before, err_msg=path)


def _one_step(grad_accum_steps, batch, tx=None):
    params = init_params(TINY, jax.random.key(0))
    schedule = optax.constant_schedule(1e-2)
    tx = tx or optax.adamw(schedule, weight_decay=0.1)
    state = steps_lib.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))
    step = jax.jit(steps_lib.make_train_step(steps_lib.lm_loss_fn(GPT(TINY)), tx, schedule, grad_accum_steps))
    return step(state, batch)


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_accumulation_gives_the_same_update_for_the_same_global_batch(masked):
    tokens = jax.random.randint(jax.random.key(2), (8, 17), 0, 61)
    batch = {"tokens": tokens}
    if masked:  # different numbers of target tokens per example, as in supervised fine-tuning
        batch["weights"] = (jnp.arange(16)[None, :] >= jnp.arange(8)[:, None] * 2).astype(jnp.float32)
    # SGD: the update is the gradient itself (Adam's first step is sign(g) and amplifies rounding).
    (s1, m1), (s4, m4) = _one_step(1, batch, optax.sgd(1.0)), _one_step(4, batch, optax.sgd(1.0))
    np.testing.assert_allclose(m1["train_loss"], m4["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path):
    state, _ = _one_step(1, {"tokens": jax.random.randint(jax.random.key(2), (4, 17), 0, 61)})
    ckpts = checkpoint_lib.Checkpoints(tmp_path)
    ckpts.save(1, state, data={"position": 4}, config={"a": 1}, tokenizer={"kind": "byte"})
    ckpts.wait()
    template = jax.tree.map(jnp.zeros_like, state)
    restored, items = ckpts.restore(1, template)
    ckpts.close()
    assert {k: items[k] for k in ("data", "config", "tokenizer")} == {
        "data": {"position": 4}, "config": {"a": 1}, "tokenizer": {"kind": "byte"}}
    assert len(items["integrity"]["fingerprints"]) == len(jax.tree.leaves(state))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(make_config, tmp_path):
    def config(num_steps):
        c = make_config(train__num_steps=num_steps, train__checkpoint_every=6, train__log_every=1,
                        train__eval_every=6, optimizer__decay_steps=18, model__dropout=0.1,
                        data__prefetch=2)  # the prefetching thread (off by default on CPUs) resumes exactly too
        c.checkpoint.async_save = True  # the real default: saves overlap the next (donating) steps
        return c

    train.train_and_evaluate(config(18), tmp_path / "straight")
    train.train_and_evaluate(config(12), tmp_path / "resumed")  # "stopped" at step 12
    train.train_and_evaluate(config(18), tmp_path / "resumed")  # same command, longer: resumes at 12
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 19))
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == b["train_loss"] and a.get("eval_loss") == b.get("eval_loss"), (a, b)
    final_a, final_b = restore_state_numpy(tmp_path / "straight", 18), restore_state_numpy(tmp_path / "resumed", 18)
    for a, b in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resuming_with_a_different_model_names_the_first_mismatching_parameter(make_config, tmp_path):
    train.train_and_evaluate(make_config(train__num_steps=2, train__eval_every=2), tmp_path)
    with pytest.raises(UserError, match=r"parameter blocks_0/\S+ has shape \(64,\) there but \(96,\) here"):
        train.train_and_evaluate(make_config(train__num_steps=4, model__n_embd=96), tmp_path)
    with pytest.raises(UserError, match="trained with the byte tokenizer"):
        train.train_and_evaluate(make_config(train__num_steps=4, data__tokenizer="char"), tmp_path)
    with pytest.raises(UserError, match=r"different optimizer state .*optimizer.grad_clip_norm"):
        train.train_and_evaluate(make_config(train__num_steps=4, optimizer__grad_clip_norm=0.0), tmp_path)


def test_char_tokenizer_run_stores_its_vocabulary(make_config, tmp_path):
    train.train_and_evaluate(make_config(train__num_steps=2, train__eval_every=2, data__tokenizer="char"), tmp_path)
    ckpts = checkpoint_lib.Checkpoints(tmp_path / "checkpoints")
    spec = ckpts.read_json(2, "tokenizer")
    ckpts.close()
    assert spec["kind"] == "char" and "d" in spec["chars"] and "é" not in spec["chars"][:5]


def test_bad_training_config_fails_before_any_work(make_config, tmp_path):
    with pytest.raises(UserError, match="not divisible by train.grad_accum_steps"):
        train.train_and_evaluate(make_config(train__grad_accum_steps=3), tmp_path / "a")
    with pytest.raises(UserError, match="exceeds the model's context"):
        train.train_and_evaluate(make_config(data__seq_len=65), tmp_path / "b")
    with pytest.raises(UserError, match="learning_rate"):
        train.train_and_evaluate(make_config(optimizer__learning_rate=-1.0), tmp_path / "c")
