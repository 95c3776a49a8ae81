"""The training loop: steps, logging, evaluation, early stopping, checkpoints and preemption.
"""
import os
import signal
import threading
import time

import jax
import numpy as np

from gptlab import peak as peak_lib
from gptlab import profiling
from gptlab import progress as progress_lib
from gptlab import selection as selection_lib
from gptlab.errors import Preempted, UserError
from gptlab import steps as steps_lib
from gptlab.metrics import MetricsWriter


class PreemptionGuard:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second signal exits at once.

    With several processes a signal may reach only one of them, and a process that stops alone leaves the
    others waiting in the collective checkpoint write. There the first signal is handed to JAX's preemption
    sync service instead, and every process stops after the same step (see `stop_after`).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._coordinated = jax.process_count() > 1
        if self._coordinated:
            from jax._src import distributed  # pylint: disable=g-import-not-at-top

            if distributed.global_state.preemption_sync_manager is None:
                raise UserError("a multi-process run needs JAX's preemption service to stop all its processes at "
                                "the same step, and jax_enable_preemption_service is off: set "
                                "JAX_ENABLE_PREEMPTION_SERVICE=true (or leave it unset)")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self.requested:
            os._exit(128 + signum)  # the second signal: no checkpoint, exit now
        self.requested = True
        if self._coordinated:
            _notify_preemption_sync_service()

    def stop_after(self, steps_this_run: int) -> bool:
        """Whether to checkpoint and stop now, after this run's `steps_this_run`-th step; call it every step.

        One process: whether a signal arrived. Several: whether this is the step JAX's preemption sync
        protocol chose once any process was signalled (the furthest process's step + 1), the same step
        on every process. Between signals it is a local counter check, no collective and no host sync.
        The count starts at 1 in every run (not the global step), so that a notice that arrives before the
        loop (JAX's own SIGTERM notifier holds the signal until this guard replaces it) still lands on
        the first step of a resumed run."""
        if not self._coordinated:
            return self.requested
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        return multihost_utils.reached_preemption_sync_point(steps_this_run)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# The coordination-service key JAX's preemption sync manager watches (its preemption_sync_manager.cc);
# tests/test_multihost.py fails if a JAX upgrade renames it.
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def _notify_preemption_sync_service():
    """Tells every process of the run that one was signalled, the way JAX's own SIGTERM notifier does.

    JAX's notifier catches SIGTERM only while no Python handler replaces it, and never SIGINT, so the guard
    above publishes the notice itself (JAX has no public call for it; Orbax reaches this client the same
    way). The value is the expected death time: now, so the sync protocol starts at once."""
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    try:
        distributed.global_state.client.key_value_set(
            PREEMPTION_NOTICE_KEY, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except Exception:  # pylint: disable=broad-except
        pass  # already published (another process was signalled too), or the coordinator is gone


def check_finite(fetched, skip_nonfinite: bool, max_in_a_row: int, in_a_row: int, last_saved, log) -> int:
    """Stops at the first non-finite loss or gradient norm, or (skipping) logs it and counts.

    Returns the number of non-finite steps in a row so far. Raising here, before
    any save, keeps a poisoned state out of the checkpoints.
    """
    for step, metrics in fetched:
        loss, grad_norm = float(metrics["train_loss"]), float(metrics["grad_norm"])
        if np.isfinite(loss) and np.isfinite(grad_norm):
            in_a_row = 0
            continue
        in_a_row += 1
        kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
                else "no checkpoint was written")
        if not skip_nonfinite:
            raise UserError(f"non-finite training loss {loss} / gradient norm {grad_norm} at step {step}; {kept}. "
                            "Lower optimizer.learning_rate, raise optimizer.warmup_steps, or set "
                            "train.skip_nonfinite_steps=True to skip such updates")
        log(f"step {step}: non-finite loss {loss} / gradient norm {grad_norm}: update skipped "
            f"({in_a_row} in a row)")
        if in_a_row >= max_in_a_row:
            raise UserError(f"{in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row={max_in_a_row}) "
                            f"at step {step}; {kept}. Lower optimizer.learning_rate or check the data")
    return in_a_row


def run_loop(config, workdir, state, batches, train_step, eval_step, eval_batches, save, log, is_main,
             flops_per_token: float, dtype: str, stopping=None, carried_losses=()) -> dict:
    """The loop every experiment shares: step, log, evaluate, checkpoint; returns final metrics.

    `save(step, state, wait=False, metrics=None, unlogged_train_losses=())` writes a checkpoint (in the
    background unless `wait`); `metrics`, the validation metrics of that step, rank it for the best
    checkpoint; `unlogged_train_losses`, the training losses since the last logged step, go with it.
    `carried_losses`: those of the checkpoint a run resumes from, so that the first logged train_loss
    after a resume averages the same steps as an uninterrupted run's.
    `stopping` (gptlab.selection.EarlyStopping) records every evaluation: a new best is saved at
    once, and the loop ends after `train.early_stopping_patience` evaluations without one.
    """
    stopping = stopping or selection_lib.EarlyStopping(train_cfg_metric(config), 0)
    train = config.train
    start_step = int(np.ravel(jax.device_get(state.step))[0])  # replicated per device under pmap
    peak, peak_source = peak_lib.total_peak_tflops(train.peak_tflops)
    log(f"MFU is measured against {peak:.3g} TFLOP/s ({peak_source}); {dtype} compute")
    profiler = profiling.StepProfiler(tuple(train.get("profile_steps") or ()),
                                 train.get("profile_dir") or str(workdir / "profile"), log)
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step, wandb_config=config.get("wandb"))
    final = {"step": start_step}
    last_step = train.num_steps
    if stopping.stopped:
        last_step = start_step
        log(f"early stopping ended this run at step {start_step} (best step {stopping.best_step}): "
            "nothing to train, evaluating only")
    elif start_step >= train.num_steps:
        log(f"step {start_step} >= train.num_steps={train.num_steps}: nothing to train, evaluating only")
    progress = progress_lib.Progress(train.num_steps, start_step, enabled=is_main,
                                     every_s=train.get("progress_every_s", 30.0))
    log.bar = progress.bar if not progress.bar.disable else None
    guard = PreemptionGuard()
    pending = []  # (step, device metrics) not yet fetched; fetched only to log or before a save
    unlogged = []  # fetched (step, host metrics) since the last logged record
    in_a_row, last_saved = 0, start_step or None
    carried = [float(x) for x in carried_losses]  # losses of steps before the resume, not yet logged

    def unlogged_losses():
        return carried + [float(m["train_loss"]) for _, m in unlogged if np.isfinite(float(m["train_loss"]))]
    if train.get("eval_at_start") and start_step == 0 < last_step and not stopping.stopped:
        # The starting model is a candidate too (fine-tuning: the untouched pretrained model), so a run whose
        # updates only hurt on validation keeps its start rather than its least bad update.
        evals = steps_lib.evaluate(eval_step, state.params, eval_batches)
        writer.write(0, evals)
        log("step      0 | " + " | ".join(f"{k} {_fmt(v)}" for k, v in evals.items()) + " (the starting model)")
        stopping.update(0, evals)
        save(0, state, metrics=evals)
        last_saved = 0
    interval_start = time.perf_counter()
    try:
        for step in range(start_step + 1, last_step + 1):
            profiler.before(step)
            state, metrics = train_step(state, next(batches))
            profiler.after(step, state)
            pending.append((step, metrics))
            log_now = step % train.log_every == 0 or step == train.num_steps
            stop = guard.stop_after(step - start_step)  # read once: a later signal is handled at a later step
            save_now = step % train.checkpoint_every == 0 or step == train.num_steps or stop
            if log_now or save_now:
                fetched = jax.device_get(pending)
                pending = []
                in_a_row = check_finite(fetched, train.skip_nonfinite_steps, train.max_nonfinite_in_a_row,
                                        in_a_row, last_saved, log)
                unlogged += fetched
            record = {}
            if log_now:
                elapsed = time.perf_counter() - interval_start
                tokens = sum(float(m["tokens"]) for _, m in unlogged)  # this process's, for throughput
                losses = unlogged_losses()
                record.update(
                    train_loss=float(np.mean(losses)) if losses else float("nan"),
                    grad_norm=float(unlogged[-1][1]["grad_norm"]),
                    learning_rate=float(unlogged[-1][1]["learning_rate"]),
                    tokens_per_sec=tokens / elapsed,
                    mfu=tokens / elapsed * flops_per_token / (peak * 1e12))
                record.update({k: float(np.mean([float(m[k]) for _, m in unlogged])) for k in unlogged[-1][1]
                               if k.startswith("train_") and k != "train_loss"})
                unlogged, carried = [], []
            evals, new_best = None, False
            if step % train.eval_every == 0 or step == train.num_steps:
                evals = steps_lib.evaluate(eval_step, state.params, eval_batches)
                record.update(evals)
                new_best = stopping.update(step, evals)
            if record:
                writer.write(step, record)
                log(f"step {step:6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in record.items()))
                final.update(record, step=step)
                progress.observe(record)
            progress.update(step)
            if stopping.stopped:
                by = (f" by more than train.early_stopping_min_delta={stopping.min_delta:g} on {stopping.reference:.4f}"
                      if stopping.min_delta else "")
                log(f"early stopping at step {step}: {stopping.metric} has not improved{by} for "
                    f"{stopping.evals_since_best} evaluations (train.early_stopping_patience={stopping.patience}); "
                    f"best {stopping.best_value:.4f} at step {stopping.best_step}")
            if save_now or new_best or stopping.stopped:
                if not save_now:  # an unscheduled save: first the checks a scheduled one gets
                    fetched = jax.device_get(pending)
                    pending = []
                    in_a_row = check_finite(fetched, train.skip_nonfinite_steps, train.max_nonfinite_in_a_row,
                                            in_a_row, last_saved, log)
                    unlogged += fetched
                save(step, state, wait=stop or stopping.stopped, metrics=evals, unlogged_train_losses=unlogged_losses())
                last_saved = step
            if stop:
                raise Preempted(step, workdir)
            if stopping.stopped:
                break
            if record or save_now:  # keep evaluation and saving out of the throughput figures
                interval_start = time.perf_counter()
    finally:
        profiler.stop()
        guard.restore()
        progress.close()
        log.bar = None
        writer.close()
    if "eval_loss" not in final:
        evals = steps_lib.evaluate(eval_step, state.params, eval_batches)
        final.update(evals)
        if stopping.best_step is None and start_step == 0:  # evaluation only (num_steps=0): the model as given
            stopping.update(0, evals)  # is the best checkpoint, saved so that it is scored on test like any other
            save(0, state, wait=True, metrics=evals)
    return final


def train_cfg_metric(config) -> str:
    return config.train.get("selection_metric", "eval_loss")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
