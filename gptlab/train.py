"""Training: one train state, one pure train step, one loop.

Start-up order (documented once, in `start_and_run`, used by every experiment):
resume this workdir's own latest checkpoint if there is one; otherwise
initialise (from scratch for pretraining, from `init_from` for fine-tuning).
"""
import json
import time

import jax
import numpy as np

from gptlab import checkpoint as checkpoint_lib
from gptlab import files
from gptlab import lock as lock_lib
from gptlab import metrics as metrics_lib
from gptlab import optim
from gptlab import parallel as parallel_lib
from gptlab import perf
from gptlab import progress as progress_lib
from gptlab import results
from gptlab import selection as selection_lib
from gptlab import tokenizers as tokenizers_lib
from gptlab.data import pipeline
from gptlab.errors import UserError
from gptlab.experiment import (Experiment, check_train_config, enable_compilation_cache, examples_in, init_and_compile,
                               prefetched, pretrain_experiment, resolve_seq_len)
from gptlab.loop import run_loop
from gptlab import steps as steps_lib


class Logger:
    """Prints on process 0 only, above the progress bar when there is one."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)



def train_and_evaluate(config, workdir) -> dict:
    """Pretrains the model in `config`, writing everything into `workdir`; returns final metrics.

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one.
    """
    log, is_main = start(config)
    return run_experiment(config, workdir, _train, log, is_main)



def start(config) -> tuple:
    """Everything a run does before it reads its config; returns (log, is_main). Called once, first, by
    `train_and_evaluate` and `gptlab.finetune.finetune_and_evaluate`.

    The one place a run's "auto" fields are resolved (`perf.resolve_auto`, in place, logged in one line):
    after it the config holds only concrete values, and the library below refuses one that does not.
    """
    perf.start_cpu_devices(config)  # before anything starts JAX's backend
    check_train_config(config)
    parallel_lib.initialize_distributed(config.parallel)  # before anything touches devices
    enable_compilation_cache(config.train.get("compilation_cache_dir"))  # before anything is compiled
    is_main = jax.process_index() == 0
    log = Logger(is_main)
    perf.resolve_auto(config, log)  # "auto" speed settings, before the config is used or stored
    return log, is_main



def run_experiment(config, workdir, experiment, log, is_main) -> dict:
    """Runs `experiment(config, workdir, checkpoints, log, is_main) -> final metrics` (`_train` for
    pretraining, `gptlab.finetune` for fine-tuning) with what all experiments share: a writable workdir,
    its lock and its checkpoint manager. `config` is resolved already (`start`)."""
    perf.check_resolved(config)
    workdir = checkpoint_lib.check_writable(workdir)
    finished = already_finished(workdir, config)
    if finished is not None:  # rerunning a finished command changes nothing, not even the lock's record
        log(f"already finished: {workdir / results.FILENAME} holds step {finished['step']} of this same config; "
            f"nothing to do (move it away to evaluate again)")
        return finished
    refuse_rewriting_finished(workdir, config)
    writer_lock = lock_workdir(workdir, is_main)  # before anything in the workdir is written or cleaned
    try:
        # Proven writable now, in seconds, rather than at the first save inside Orbax's writer threads.
        checkpoint_lib.check_writable(workdir / "checkpoints", what="the checkpoint directory ")
        checkpoints = checkpoint_lib.Checkpoints(
            workdir / "checkpoints", config.checkpoint.max_to_keep, config.checkpoint.async_save,
            selection_metric=config.train.get("selection_metric", "eval_loss"))
    except BaseException:
        if writer_lock:
            writer_lock.restore_record()
            writer_lock.release()
        raise
    try:
        while True:
            try:
                return experiment(config, workdir, checkpoints, log, is_main)
            except checkpoint_lib.CorruptCheckpoint as e:  # raised at start-up, before any training
                if not config.checkpoint.fallback_on_corruption:
                    raise UserError(f"{e}. Move or delete {e.path} to resume from the previous checkpoint, "
                                    "or rerun with --config.checkpoint.fallback_on_corruption=True") from None
                moved = checkpoints.quarantine(e.step)
                log(f"warning: {e}; moved it to {moved} and falling back to the previous checkpoint")
    finally:
        metrics_lib.finish_wandb()  # a run that stopped early: its W&B run (if any) is marked failed
        try:
            checkpoints.close()
        finally:
            if writer_lock:
                if not checkpoints.accepted:  # a refused start leaves the workdir as it found it, lock file too
                    writer_lock.restore_record()
                writer_lock.release()



def already_finished(workdir, config):
    """WORKDIR/result.json's contents if it records a finished run of `config` (all its steps), else None."""
    try:
        stored = json.loads((workdir / results.FILENAME).read_text())
    except (OSError, ValueError):
        return None
    current, stored_config = json.loads(config.to_json_best_effort()), stored.get("config") or {}
    for group, field in (("model", "vocab_size"), ("data", "seq_len")):  # resolved at the start of the run
        if current.get(group, {}).get(field) is None and group in current:
            current[group][field] = (stored_config.get(group) or {}).get(field)
    finished = stored_config == current and stored.get("steps") == config.train.num_steps
    return stored if finished and "step" in stored else None



def refuse_rewriting_finished(workdir, config) -> None:
    """A finished run's result.json is never rewritten by a rerun with other settings (one line, exit 2),
    unless the rerun raises train.num_steps past it: that trains on from its last checkpoint."""
    try:
        stored = json.loads((workdir / results.FILENAME).read_text())
        stored_config, steps = stored["config"], int(stored["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not finished (or not readable as a result: the run's own start-up reports damage)
    current = json.loads(config.to_json_best_effort())
    for group, field in (("model", "vocab_size"), ("data", "seq_len")):  # resolved at the start of the run
        if current.get(group, {}).get(field) is None and group in current:
            current[group][field] = (stored_config.get(group) or {}).get(field)
    changes = config_changes(stored_config, current)
    if not changes or config.train.num_steps > steps:
        return
    raise UserError(f"{workdir / results.FILENAME} records a finished run of {steps} steps with other settings "
                    f"({describe_changes(changes)}), which a rerun would overwrite: to train it on, raise "
                    f"--config.train.num_steps above {steps}; to run these settings, use a new --workdir")



def config_changes(old: dict, new: dict, prefix: str = "") -> list:
    """[(dotted field, old value, new value)] where two JSON configs differ; fields absent from `old` (written
    before the field existed) are not compared."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            changes += config_changes(old[key], value, f"{prefix}{key}.")
        elif old[key] != value:
            changes.append((f"{prefix}{key}", old[key], value))
    return changes



def describe_changes(changes, limit: int = 4) -> str:
    text = ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")



# Fields a resumed run may change; any other model or data field, or the seed, changes what the checkpoint's
# steps mean or what its parameters compute, and the resume is refused. Implementation choices (same function),
# locations of the same data, and how far ahead to read:
RESUMABLE_FIELDS = ("model.attention", "model.remat", "model.dense_backward", "data.data_dir", "data.manual_dir",
                    "data.text_dir", "data.cache_dir", "data.gpt2_encoding_file", "data.prefetch", "data.test_split",
                    "data.batch_size")  # a new batch size is honoured: tokens_seen adds each segment's own



REFUSED_GROUPS = ("model.", "data.", "finetune.task", "seed")



def check_resume(stored_config: dict, config_json: dict, step: int, where) -> list:
    """Refuses (UserError, one line) a resume whose config changes what the checkpoint at `step` means;
    returns the changes that are honoured (batch size, number of steps, optimizer, schedule of evaluations)."""
    changes = config_changes(stored_config, config_json)
    refused = [c for c in changes if c[0] not in RESUMABLE_FIELDS and c[0].startswith(REFUSED_GROUPS)]
    if refused:
        raise UserError(f"cannot resume {where} (step {step}) with other settings: {describe_changes(refused)} "
                        "would change what its steps mean; restore those settings to resume, or start a fresh "
                        "--workdir (nothing in the workdir was changed)")
    return [c for c in changes if not c[0].startswith(("parallel.", "wandb.")) and c[0] not in (
        "model.attention", "model.remat", "model.dense_backward", "data.prefetch")]



WRITER_LOCK = ".writer.lock"  # in the workdir; names the process that trains there



def lock_workdir(workdir, is_main: bool):
    """One writer per workdir: process 0 takes WORKDIR/.writer.lock (see gptlab.lock), or every process
    stops with one line naming the live writer. The other processes of a multi-host run learn the outcome
    from process 0, so they stop with it. Returns the lock (None on processes other than 0)."""
    held, refusal = None, ""
    if is_main:
        try:
            held = lock_lib.FileLock(workdir / WRITER_LOCK)
        except lock_lib.LockHeld as e:
            refusal = (f"--workdir={workdir} is in use by another run: {e.strerror}; wait for it to finish or stop "
                       f"it (kill {e.holder.get('pid', 'PID')}), or choose another --workdir")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not multihost_utils.broadcast_one_to_all(np.int32(bool(refusal))):
            return held
        refusal = refusal or f"--workdir={workdir} is in use by another run (process 0 was refused its lock)"
    if refusal:
        raise UserError(refusal)
    return held



def _train(config, workdir, checkpoints, log, is_main) -> dict:
    latest = checkpoints.latest_step()
    tokenizer = None
    if latest is not None:
        tokenizer = tokenizers_lib.from_json(checkpoints.read_json(latest, "tokenizer"), config.data)
        tokenizers_lib.check_matches(tokenizer, config.data, where=str(workdir))
    seq_len = resolve_seq_len(config)
    data = pipeline.Data(config.data, seq_len, config.seed, tokenizer,
                         jax.process_index(), jax.process_count(), log=log, workdir=workdir)
    return start_and_run(config, workdir, checkpoints, log, is_main, pretrain_experiment(config, data, log))



def start_and_run(config, workdir, checkpoints, log, is_main, exp: Experiment) -> dict:
    """The start-up every experiment shares, then the loop; returns the final metrics.

    Start-up order: resume this workdir's latest checkpoint if there is one;
    otherwise `exp.init_from` (fine-tuning: pretrained parameters loaded into the
    fresh state); otherwise the fresh state (from scratch). Writes
    WORKDIR/config.json once the start is accepted (every resume check passed: until then nothing in
    the workdir is written) and WORKDIR/result.json (see gptlab.results) last.
    """
    started = time.perf_counter()
    latest = checkpoints.latest_step()
    # Every resume check runs before anything in the workdir is written: a refused start changes no file.
    stored_config, honoured = None, []
    if latest is not None:
        with checkpoint_lib.Reader(checkpoints.directory, latest, pin=False) as reader:
            checkpoint_lib.check_same_shapes(reader.stored["params"], jax.eval_shape(exp.init_params),
                                             where=f"checkpoint step {latest} in {checkpoints.directory}")
            stored_config = reader.config
        honoured = check_resume(stored_config, exp.config_json, latest, checkpoints.directory)
    parallel = parallel_lib.Parallel(config.parallel, config.data.batch_size, config.train.grad_accum_steps, log)
    state, train_step, eval_step = init_and_compile(config, exp, parallel, log)
    train_cfg = config.train
    stopping = selection_lib.EarlyStopping(train_cfg.get("selection_metric", "eval_loss"),
                                           train_cfg.get("early_stopping_patience", 0),
                                           min_delta=float(train_cfg.get("early_stopping_min_delta", 0.0)))
    abstract = parallel.abstract_state(state)
    # Input tokens a step processes; tokens_seen sums it over the run's segments (a resume may change the batch).
    step_tokens = int(config.data.batch_size) * int(exp.config_json["data"]["seq_len"])
    tokens_before, carried_losses = 0, []
    if latest is not None:
        state, items = checkpoints.restore(latest, abstract)
        state = parallel.place_restored(state)
        exp.batches.restore(items["data"])
        if items.get("selection"):
            stopping = selection_lib.EarlyStopping.from_json(items["selection"], stopping.metric, stopping.patience,
                                                             stopping.min_delta)
        progress = items.get("progress") or {}
        tokens_before = int(progress.get("tokens_seen", latest * int(stored_config["data"]["batch_size"])
                                         * int(stored_config["data"]["seq_len"])))  # older checkpoints: one batch
        carried_losses = list(progress.get("unlogged_train_losses", []))
        log(f"resumed from {checkpoints.directory / str(latest)} (step {latest})")
        if honoured:
            log(f"resuming with changed settings, honoured: {describe_changes(honoured, limit=8)}; tokens_seen "
                f"counts {tokens_before:,} tokens up to step {latest}, then {step_tokens:,} a step")
    elif exp.init_from is not None:
        state = parallel.place_restored(exp.init_from(parallel.checkpointable(state), parallel.abstract_state(state)))
    else:
        log("no checkpoint in the workdir: starting from scratch")
    checkpoints.accepted = True  # from here on the workdir is written
    if is_main:
        files.write_atomic(workdir / "config.json", json.dumps(exp.config_json, indent=2) + "\n")
    if exp.accepted is not None:
        exp.accepted()
    batches = prefetched(config, exp.batches, parallel)  # after the restore: it reads ahead from there
    start_step = latest or 0
    tokens_seen = lambda step: tokens_before + (step - start_step) * step_tokens

    def save(step, state, wait=False, metrics=None, unlogged_train_losses=()):
        # progress: what the run's bookkeeping needs beyond the state, so a resumed run counts as an uninterrupted one
        progress = {"tokens_seen": tokens_seen(step), "unlogged_train_losses": list(unlogged_train_losses)}
        checkpoints.save(step, parallel.checkpointable(state), data=batches.state(), config=exp.config_json,
                         tokenizer=exp.tokenizer.to_json(), selection=stopping.to_json(), metrics=metrics,
                         progress=progress)
        if wait:
            checkpoints.wait()

    try:
        final = run_loop(config, workdir, state, batches, train_step, eval_step, exp.eval_batches, save, log,
                         is_main, flops_per_token=exp.flops_per_token, dtype=exp.dtype, stopping=stopping,
                         carried_losses=carried_losses)
    finally:
        if batches is not exp.batches:
            batches.close()
    final["selection"] = selection_record(config, checkpoints, stopping, final, log, lambda step: steps_lib.evaluate(
        eval_step, parallel.place_restored(checkpoints.restore(step, abstract)[0]).params, exp.test_batches,
        prefix="test") if exp.test_batches else None)
    if final["selection"].get("test"):  # the n behind the test numbers (this process's share on several hosts)
        final["selection"]["test_examples"] = examples_in(exp.test_batches)
    if exp.extra_results is not None:
        final.update(exp.extra_results(final))
    if is_main:  # its presence marks the run finished (experiments.sweep skips such cells)
        artefacts = exp.write_artefacts(final) if exp.write_artefacts else ()
        result = results.write_result(workdir, final, exp.config_json, jax.eval_shape(exp.init_params),
                                      exp.trainable, wall_time_s=time.perf_counter() - started,
                                      resumed_from_step=latest, train_data_tokens=exp.train_data_tokens,
                                      data_examples=exp.data_examples,
                                      optimizer_state_bytes=optim.state_bytes(abstract.opt_state),
                                      artefacts=artefacts, tokens_seen=tokens_seen(int(final["step"])))
        metrics_lib.finish_wandb(workdir, result)
        for line in progress_lib.summary_lines(workdir, result, "finetune" if "finetune" in exp.config_json
                                               else "pretrain"):
            log(line)
    return final



def selection_record(config, checkpoints, stopping, final: dict, log, test_of_step) -> dict:
    """result.json's `selection`: the best checkpoint (by validation), its validation and test metrics,
    and how the run ended (stopped early, or at the budget cap while still improving)."""
    checkpoints.wait()
    best_step = stopping.best_step
    record = {"metric": stopping.metric, "mode": selection_lib.mode(stopping.metric), "split": config.data.eval_split,
              "best_step": best_step, "validation": stopping.best_metrics, "test_split": config.data.get("test_split"),
              "test": None, "patience": stopping.patience, "stopped_early": stopping.stopped,
              "budget_steps": config.train.num_steps, "last_step": final["step"]}
    # How the run ended: early stopping, or the budget cap (train.num_steps), whether or not still improving.
    record["stopped_by"] = "early_stopping" if stopping.stopped else "budget"
    # At the cap and the last evaluation was the best: more steps would likely have helped.
    record["hit_budget_while_improving"] = bool(
        best_step is not None and not stopping.stopped and final["step"] >= config.train.num_steps
        and stopping.evals_since_best == 0 and best_step > 0)
    if best_step is not None and best_step in checkpoints.manager.all_steps():
        orbax_best = checkpoints.manager.best_step()
        if orbax_best != best_step:  # both rank the same metrics; a difference means a foreign checkpoint
            log(f"warning: Orbax ranks step {orbax_best} best, the run's record step {best_step}; scoring {best_step}")
        record["test"] = test_of_step(best_step)
        if record["test"]:
            log(f"best checkpoint: step {best_step}, {stopping.metric} {stopping.best_value:.4f} on "
                f"{config.data.eval_split}; on {config.data.test_split}: " +
                " | ".join(f"{k} {v:.4f}" for k, v in record["test"].items()))
    return record
