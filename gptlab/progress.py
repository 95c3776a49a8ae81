"""Training progress for any console: a tqdm bar on a terminal, timestamped lines elsewhere.

Under SLURM, `nohup` or a pipe, stderr is no terminal and a progress bar would be
lost or garble the log, so every `train.progress_every_s` seconds (and at the last
step) one plain line goes to stderr instead:

    2026-11-29 19:40:12 | step 120/300 (40%) | elapsed 0:01:02 | ETA 0:01:33 | 1.93 step/s | 12,345 tokens/s | train_loss 2.1234

A run ends with `summary_lines`: final and best metrics, wall time, where the
checkpoints are and the commands that use them.
"""
import datetime
import shlex
import sys
import time

import tqdm


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Steps `initial`..`total` of a run; `update()` once per step, `observe()` with logged metrics."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every_s: float = 30.0,
                 stream=None, clock=time.monotonic, now=datetime.datetime.now):
        self.total, self.step, self.every_s = total, initial, every_s
        self.stream = stream if stream is not None else sys.stderr
        self._clock, self._now = clock, now
        self.started = self._clock()
        self._base = None  # (time, step) of the first update: step/s and ETA leave out compilation before it
        self._last_line = self.started
        self.latest = {}  # the last logged metrics: tokens_per_sec, train_loss, eval_loss, ...
        terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream,
                             disable=not terminal)
        self.lines = enabled and not terminal  # plain lines instead of a bar

    def observe(self, metrics: dict) -> None:
        """Remembers the metrics of a logged step for the next line (and the bar's postfix)."""
        self.latest.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if "train_loss" in metrics and "tokens_per_sec" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}")

    def update(self, step: int) -> None:
        """Step `step` was taken: moves the bar, or writes a line when `every_s` has passed (and at the end)."""
        self.bar.update(step - self.step)
        self.step = step
        if self.lines:
            now = self._clock()
            if self._base is None:
                self._base = (now, step)
            elif now - self._last_line >= self.every_s or step == self.total:
                self._last_line = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = (self.step - self._base[1]) / (now - self._base[0]) if now > self._base[0] else 0.0
        eta = (self.total - self.step) / rate if rate > 0 else float("nan")
        parts = [self._now().strftime("%Y-%m-%d %H:%M:%S"),
                 f"step {self.step}/{self.total} ({100.0 * self.step / max(self.total, 1):.0f}%)",
                 f"elapsed {_clock(elapsed)}", f"ETA {_clock(eta) if eta == eta else '?'}", f"{rate:.3g} step/s"]
        if "tokens_per_sec" in self.latest:
            parts.append(f"{self.latest['tokens_per_sec']:,.0f} tokens/s")
        parts += [f"{k} {self.latest[k]:.4f}" for k in ("train_loss", "eval_loss") if k in self.latest]
        return " | ".join(parts)

    def close(self) -> None:
        self.bar.close()


def summary_lines(workdir, result: dict, kind: str = "pretrain") -> list:
    """The end-of-run summary: final and best metrics, wall time, checkpoints, and what to run next."""
    workdir = str(workdir)
    metrics = {k: v for k, v in result.items() if isinstance(v, float) and (k.endswith("loss") or "accuracy" in k)}
    lines = [f"run finished: step {result.get('step')} in {_clock(result.get('timing', {}).get('wall_time_s', 0.0))}"
             + (f" (resumed from step {result['timing']['resumed_from_step']})"
                if result.get("timing", {}).get("resumed_from_step") else "")]
    lines.append("  final: " + (", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no metrics"))
    best = result.get("best") or {}
    if best:
        lines.append("  best:  " + ", ".join(f"{k} {b['value']:.4f} (step {b['step']})" for k, b in best.items()))
    quoted = shlex.quote(workdir)
    lines += [f"  checkpoints: {workdir}/checkpoints/ ; metrics: {workdir}/metrics.jsonl ; "
              f"result: {workdir}/result.json",
              "  next:",
              f"    python -m experiments.sample --workdir={quoted} --prompt='def '",
              f"    python -m experiments.evaluate --workdir={quoted}",
              f"    tensorboard --logdir={shlex.quote(workdir + '/tensorboard')}"]
    if kind == "pretrain":
        lines.append(f"    python -m experiments.finetune --config=configs/finetune.py:lora "
                     f"--workdir={shlex.quote(workdir + '_lora')} --config.finetune.init_from={quoted}")
    return lines
