"""Faults a long run meets: preemption, kill -9, damaged checkpoints, NaNs, a full disk."""
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FULL, REPO, restore_state_numpy
from gptlab import checkpoint as checkpoint_lib
from gptlab import train
from gptlab import loop as loop_lib
from gptlab import steps as steps_lib
from gptlab.errors import Preempted, UserError
from gptlab.metrics import read_metrics
from gptlab.model import GPT, GPTConfig, init_params

STEPS = 24
PAUSE_HOOK = pathlib.Path(__file__).parent / "pause_hook"
RUN_ARGS = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3", "--config.train.log_every=1",
            "--config.train.eval_every=12", "--config.model.dropout=0.1"]


def start(workdir, data_dir, *args, pause=None):
    """The run as a child process; `pause`: where it waits (tests/pause_hook/sitecustomize.py)."""
    cmd = [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", *RUN_ARGS, *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if pause is not None:
        env.update(GPTLAB_TEST_PAUSE=json.dumps(pause), PYTHONPATH=os.pathsep.join([str(PAUSE_HOOK), str(REPO)]))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)


def logged_steps(workdir):
    return len(read_metrics(workdir))


def saving(workdir):
    ckpts = workdir / "checkpoints"
    return ckpts.exists() and any("tmp" in p.name for p in ckpts.iterdir())


def assert_identical_runs(a, b):
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    assert [(m["train_loss"], m.get("eval_loss")) for m in ma] == [(m["train_loss"], m.get("eval_loss")) for m in mb]
    for x, y in zip(jax.tree.leaves(restore_state_numpy(a, STEPS)), jax.tree.leaves(restore_state_numpy(b, STEPS))):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = start(workdir, data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return workdir


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_the_rerun_matches_the_uninterrupted_run(reference, tmp_path, data_dir):
    proc = start(tmp_path, data_dir)
    wait_until(lambda: logged_steps(tmp_path) >= 7, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == Preempted.EXIT_CODE
    err = proc.stderr.read()
    step = int(err.split("preempted at step ")[1].split(":")[0])
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert 7 <= step < STEPS and str(step) in saved, (saved, err)  # saved where it stopped
    rerun = start(tmp_path, data_dir)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert_identical_runs(reference, tmp_path)


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    guard = loop_lib.PreemptionGuard()
    try:
        guard._handle(signal.SIGTERM, None)
        assert guard.requested and not exits
        guard._handle(signal.SIGTERM, None)
        assert exits == [128 + signal.SIGTERM]
    finally:
        guard.restore()


@pytest.mark.slow
def test_kill_9_at_six_points_including_mid_save_never_breaks_the_resumed_run(reference, tmp_path, data_dir):
    """One run killed again and again (after steps, and while a checkpoint is being written)."""
    markers = tmp_path.parent / f"{tmp_path.name}-pause"
    markers.mkdir()
    # Mid-save: the run waits (for ever) just before its next checkpoint's folder would be renamed into place.
    mid_save = lambda i: dict(marker=str(markers / str(i)), checkpoint_commit=True)
    kill_points = [(lambda i: logged_steps(tmp_path) >= 2, None),
                   (lambda i: (markers / f"{i}.paused").exists(), mid_save),
                   (lambda i: logged_steps(tmp_path) >= 8, None),
                   (lambda i: (markers / f"{i}.paused").exists(), mid_save),
                   (lambda i: logged_steps(tmp_path) >= 16, None),
                   (lambda i: (markers / f"{i}.paused").exists(), mid_save)]
    killed_mid_save = 0
    for i, (point, pause) in enumerate(kill_points):
        proc = start(tmp_path, data_dir, pause=pause(i) if pause else None)
        wait_until(lambda: point(i), proc)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        killed_mid_save += bool(pause) and saving(tmp_path)
        ckpts = checkpoint_lib.Checkpoints(tmp_path / "checkpoints")  # what a restart would trust
        for step in ckpts.manager.all_steps():  # each listed step is complete and matches its fingerprints
            stored = restore_state_numpy(tmp_path, step)
            template = steps_lib.TrainState(step=stored["step"], params=stored["params"],
                                        opt_state=stored["opt_state"], rng=stored["rng"])
            ckpts.restore(step, jax.tree.map(np.zeros_like, template))
        ckpts.close()
    assert killed_mid_save == 3, "a kill meant to land during a checkpoint write did not"
    final = start(tmp_path, data_dir)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())  # leftovers cleaned up
    assert_identical_runs(reference, tmp_path)


def _damage_truncate(step_dir):
    data = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _damage_alter(step_dir):
    data = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = bytes(16)
    data.write_bytes(bytes(raw))


def _damage_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.fixture(scope="module")
def six_and_nine_step_runs(tmp_path_factory, data_dir):
    """A 6-step run to damage, and the 9-step run that resuming it must reproduce."""
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("damage")
    config = lambda steps: tiny_config(data_dir, train__num_steps=steps, train__checkpoint_every=3,
                                       train__eval_every=3, optimizer__decay_steps=9)
    train.train_and_evaluate(config(9), root / "straight")
    train.train_and_evaluate(config(6), root / "six")
    return root, config


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_damage_truncate, _damage_alter, _damage_metadata])
def test_a_damaged_latest_checkpoint_is_detected_and_fallback_is_opt_in(six_and_nine_step_runs, tmp_path, damage):
    import shutil

    root, config = six_and_nine_step_runs
    run = tmp_path / "run"
    shutil.copytree(root / "six", run)
    damage(run / "checkpoints" / "6")
    with pytest.raises(UserError, match=r"checkpoint step 6 at \S+ is damaged: .*fallback_on_corruption=True"):
        train.train_and_evaluate(config(9), run)
    assert (run / "checkpoints" / "6").is_dir()  # refused, and nothing moved or deleted
    cfg = config(9)
    cfg.checkpoint.fallback_on_corruption = True
    train.train_and_evaluate(cfg, run)  # falls back to step 3 and trains on
    assert [p.name.split(".")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["6"]
    a, b = restore_state_numpy(root / "straight", 9), restore_state_numpy(run, 9)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_nan_stops_training_before_it_reaches_a_checkpoint(make_config, tmp_path):
    config = make_config(optimizer__learning_rate=1e6, optimizer__min_learning_rate=0.0, optimizer__warmup_steps=0,
                         optimizer__grad_clip_norm=0.0, train__checkpoint_every=1, train__num_steps=30)
    with pytest.raises(UserError, match=r"non-finite training loss .* at step (\d+); the last good checkpoint"):
        train.train_and_evaluate(config, tmp_path)
    ckpts = checkpoint_lib.Checkpoints(tmp_path / "checkpoints")
    steps = ckpts.manager.all_steps()
    ckpts.close()
    for step in steps:  # every checkpoint that exists is finite: the poisoned state was never saved
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(restore_state_numpy(tmp_path, step)["params"]))


@pytest.mark.slow
def test_skipping_nonfinite_steps_leaves_the_state_untouched_and_gives_up_after_a_limit():
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=1, n_embd=8)
    model_loss = steps_lib.lm_loss_fn(GPT(cfg))

    def loss_fn(params, batch, key):  # a "bad batch" (poison=1) yields a NaN loss and NaN gradients
        loss, sums = model_loss(params, batch, key)
        return loss * jnp.where(batch["poison"][0] > 0, jnp.nan, 1.0), sums

    params = init_params(cfg, jax.random.key(0))
    tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=2**31 - 1)
    state = steps_lib.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))
    step_fn = jax.jit(steps_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-2)))
    tokens = jnp.ones((2, 9), jnp.int32)
    bad, good = {"tokens": tokens, "poison": jnp.ones((2,))}, {"tokens": tokens, "poison": jnp.zeros((2,))}
    after_bad, metrics = step_fn(state, bad)
    for a, b in zip(jax.tree.leaves(after_bad.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    after_good, _ = step_fn(after_bad, good)
    assert not np.array_equal(after_good.params["wte"]["embedding"], params["wte"]["embedding"])
    messages = []
    fetched = [(s, {"train_loss": np.nan, "grad_norm": np.nan}) for s in (1, 2)]
    assert loop_lib.check_finite(fetched, True, 3, 0, None, messages.append) == 2
    assert "step 2: non-finite loss" in messages[-1] and "update skipped (2 in a row)" in messages[-1]
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        loop_lib.check_finite(fetched[:1], True, 3, 2, 3, messages.append)
    assert loop_lib.check_finite([(4, {"train_loss": 1.0, "grad_norm": 1.0})], True, 3, 2, 3, messages.append) == 0


def test_a_state_with_skipping_on_saves_and_restores_exactly(tmp_path):
    """optax.apply_if_finite keeps a bool in the optimizer state: it must checkpoint like any leaf."""
    params = init_params(GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=1, n_embd=8), jax.random.key(0))
    tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
    state = steps_lib.TrainState(step=jnp.array(3), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))
    ckpts = checkpoint_lib.Checkpoints(tmp_path / "checkpoints")
    ckpts.save(3, state, data={}, config={}, tokenizer={})
    ckpts.wait()
    restored, _ = ckpts.restore(3, jax.tree.map(np.asarray, state))
    ckpts.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2.5 MB filesystem mounted as the run's checkpoints/ directory: room for one checkpoint."""
    mount_point = tmp_path / "run" / "checkpoints"
    mount_point.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:  # CI (GPTLAB_TEST_FULL) runs as root: there this test must run, never skip
        message = f"cannot mount a small filesystem here (needs root): {result.stderr.strip()}"
        pytest.fail(message) if FULL else pytest.skip(message)
    yield tmp_path / "run"
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no tracebacks after the error
def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_previous_checkpoint(make_config, tiny_disk):
    config = make_config(train__num_steps=9, train__checkpoint_every=3, train__eval_every=3)
    config.checkpoint.async_save = True
    with pytest.raises(UserError, match=r"could not write checkpoint step 6 .*No space left on device.*"
                                        r"checkpoints up to step 3 are intact"):
        train.train_and_evaluate(config, tiny_disk)
    ckpts = checkpoint_lib.Checkpoints(tiny_disk / "checkpoints")
    assert ckpts.manager.all_steps() == [3]  # the half-written step 6 is not trusted
    ckpts.close()
    state = restore_state_numpy(tiny_disk, 3)
    assert int(state["step"]) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def text_folder_data(make_config, tmp_path, **overrides):
    data = make_config().data
    data.dataset, data.text_dir, data.data_dir, data.exclude = "text_folder", str(tmp_path / "texts"), str(tmp_path / "tfds"), ()
    data.include = ()
    for field, value in overrides.items():
        data[field] = value
    return data


@pytest.fixture
def latin1_folder(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):  # enough files for every split
        (folder / f"ok_{i}.txt").write_text(f"plain text number {i}\n" * 5, encoding="utf-8")
    (folder / "caf\u00e9.txt").write_bytes("un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet\n".encode("latin-1"))
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    return folder


def test_text_that_does_not_decode_is_refused_with_file_and_offset_by_default(make_config, tmp_path, latin1_folder):
    from gptlab.data import pipeline

    with pytest.raises(UserError, match=r"caf\u00e9.txt is not valid utf-8: byte 6 \(0xe9\) does not decode.*"
                                        r"data.encoding.*data.decode_errors=replace"):
        pipeline.prepare(text_folder_data(make_config, tmp_path))
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))  # refused before anything was written


def test_replace_counts_bad_bytes_binary_files_are_skipped_and_latin_1_decodes(make_config, tmp_path, latin1_folder):
    from gptlab.data import corpora, pipeline

    builder = pipeline.prepare(text_folder_data(make_config, tmp_path, decode_errors="replace"))
    note = corpora.decoding_note(builder)
    assert "1 binary file(s) skipped (e.g. image.png)" in note and "3 undecodable byte sequence(s) in 1 file(s)" in note
    texts = [t for split in ("train", "validation", "test") if split in builder.info.splits
             for t in pipeline.read_texts(builder, split, "text")]
    assert len(texts) == 31 and not any("PNG" in t for t in texts)
    builder = pipeline.prepare(text_folder_data(make_config, tmp_path, encoding="latin-1"))
    assert corpora.decoding_note(builder) == "data: " + builder.info.full_name + ": 1 binary file(s) skipped (e.g. image.png)"
    texts = [t for split in builder.info.splits for t in pipeline.read_texts(builder, split, "text")]
    assert any("caf\u00e9 cr\u00e8me" in t for t in texts) and not any("\ufffd" in t for t in texts)
    with pytest.raises(UserError, match="data.decode_errors='ignore' must be one of"):
        pipeline.prepare(text_folder_data(make_config, tmp_path, decode_errors="ignore"))
    with pytest.raises(UserError, match="data.encoding='utf-9' is not a known text encoding"):
        pipeline.prepare(text_folder_data(make_config, tmp_path, encoding="utf-9"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_signal_at_any_moment_ends_in_a_checkpoint_or_a_clean_exit_and_the_rerun_loses_nothing(
        reference, tmp_path, data_dir, seed):
    """From interpreter start-up to the final evaluation: exit 75 (or 0 if it had finished), one line, no
    traceback; the rerun then reproduces the uninterrupted run bit for bit."""
    proc = start(tmp_path, data_dir)
    time.sleep(random.Random(seed).uniform(0.0, 25.0))
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert "Traceback" not in err, err
    if code == -signal.SIGTERM:  # before gptlab.cli was imported: the default action, nothing written yet
        assert not any(tmp_path.iterdir())
    else:
        assert code in (0, Preempted.EXIT_CODE), err
    rerun = start(tmp_path, data_dir)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert_identical_runs(reference, tmp_path)


_SIGNAL_INSIDE_A_GC_CALLBACK = """
import gc, os, signal, sys, time
from absl import app
from gptlab import cli

def send_sigterm_inside(phase, info):  # like JAX's gc callback: Python prints and drops what it raises
    if phase == "start":
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # bytecode boundaries: the handler runs here, inside the callback
            pass

def main():
    gc.callbacks.append(send_sigterm_inside)
    gc.collect()
    gc.callbacks.remove(send_sigterm_inside)
    time.sleep(5)
    print("ran on after the signal")

cli.run(main)
"""


def test_a_signal_that_lands_inside_a_gc_callback_still_stops_the_command_in_one_line(tmp_path):
    script = tmp_path / "command.py"
    script.write_text(_SIGNAL_INSIDE_A_GC_CALLBACK)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == Preempted.EXIT_CODE, proc.stderr
    assert "ran on after the signal" not in proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.count("stopped by SIGTERM outside the training loop") == 1, proc.stderr


@pytest.mark.slow
def test_rerunning_a_finished_command_changes_nothing(make_config, tmp_path):
    def snapshot():
        return {str(p.relative_to(tmp_path)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    config = make_config(train__num_steps=3, train__checkpoint_every=2)
    first = train.train_and_evaluate(config, tmp_path)
    before = snapshot()
    assert "result.json" in before and any(k.startswith("tensorboard/") for k in before)
    again = train.train_and_evaluate(make_config(train__num_steps=3, train__checkpoint_every=2), tmp_path)
    assert snapshot() == before  # result.json, metrics.jsonl, TensorBoard events, checkpoints: untouched
    assert again["eval_loss"] == first["eval_loss"] and again["step"] == 3
    longer = train.train_and_evaluate(make_config(train__num_steps=4, train__checkpoint_every=2), tmp_path)
    assert longer["step"] == 4  # a different command (more steps) still resumes and trains on


PREPARE_AT_ONCE = """
import pathlib, sys, time
from configs import pretrain
from gptlab.data import pipeline
data = pretrain.get_config("tiny").data
data.dataset, data.text_dir, data.data_dir, data.include, data.exclude = "text_folder", sys.argv[1], sys.argv[2], (), ()
pipeline.make_builder(data)  # everything imported and the config read: what is left is preparing
pathlib.Path(sys.argv[3]).touch()
while not pathlib.Path(sys.argv[4]).exists():
    time.sleep(0.01)
builder = pipeline.prepare(data)
print(sum(len(list(pipeline.read_texts(builder, split, "text"))) for split in builder.info.splits))
"""


def test_runs_that_prepare_one_dataset_at_the_same_moment_all_succeed(tmp_path):
    """Parallel sweep cells share a data dir: the first prepares the dataset, the others wait and read it."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(300):
        (folder / f"doc_{i}.txt").write_text(f"document {i}\n" * 200)
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_AT_ONCE, str(folder), str(tmp_path / "tfds"),
                               str(tmp_path / f"ready{k}"), str(tmp_path / "go")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(3)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out.split()[-1] == "300"  # every document, read from the one prepared copy
    assert len([p for p in (tmp_path / "tfds").rglob("*") if p.is_dir() and "incomplete" in p.name]) == 0


def test_a_damaged_prepared_file_is_refused_in_one_line_naming_the_folder(make_config, tmp_path, latin1_folder):
    from gptlab.data import pipeline

    builder = pipeline.prepare(text_folder_data(make_config, tmp_path, encoding="latin-1"))
    (records,) = pathlib.Path(builder.data_dir).glob("*-train.array_record-*")
    raw = bytearray(records.read_bytes())
    raw[64: len(raw) // 2] = bytes(len(raw) // 2 - 64)  # past the file header, into the records
    records.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"prepared dataset .* cannot be read \(.*\): it is damaged; delete "
                                        rf"{re.escape(builder.data_dir)} and rerun"):
        list(pipeline.read_texts(builder, "train", "text"))


@pytest.mark.slow
def test_config_paths_work_from_any_directory_and_a_misspelling_is_one_line(tmp_path, data_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}

    def pretrain(config, cwd):
        return subprocess.run([sys.executable, "-m", "experiments.pretrain", f"--config={config}",
                               f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}",
                               "--config.train.num_steps=0"], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)

    result = pretrain("configs/pretain.py:tiny", REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --config file configs/pretain.py does not exist (looked in {REPO} and in {REPO}): "
        "did you mean --config=configs/pretrain.py:tiny?")
    assert not (tmp_path / "run").exists()
    result = pretrain("configs/pretrain.py:tiny", tmp_path)  # run from another directory
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["config"]["preset"] == "tiny"
