"""WORKDIR/result.json: what a finished run leaves for tables, sweeps and reproduction.

Written once, atomically, by the start-up and loop every experiment shares
(`train.start_and_run`), after the last step and after the artefacts it lists;
its presence means "this run finished". It holds:

- the final metrics at the top level, as `train_and_evaluate` returns them
  (`step`, `train_loss`, `eval_loss`, `grad_norm`, `learning_rate`, and e.g.
  `eval_accuracy`), minus throughput, which lives under `timing`;
- `best`: for every loss the minimum and for every accuracy the maximum over the
  logged steps (metrics.jsonl), each with its step;
- `params`: total / trainable / frozen parameter counts (position embeddings
  included), the trainable percentage, and `non_embedding` (Kaplan et al.'s N:
  no token or position embeddings);
- `train_data_tokens`: the tokens of the training split the run could draw from
  (after `data.train_fraction`; None for example-based tasks);
- `data_examples`: for example-based tasks (sft, classify), the usable examples of
  each split (train, validation, test), after those that do not fit the window are
  dropped: what a task's numbers rest on;
- `steps`, `tokens_seen` (input tokens processed: steps x global batch x seq_len, summed over the
  run's segments when a resume changed the batch);
- `optimizer_state_bytes`: what the optimizer keeps for the trainable parameters;
- `timing`: wall time of this process's run, the last logged tokens/s and MFU,
  the process's peak resident memory, and the step it resumed from (0:
  uninterrupted) - the only part that varies
  between two runs of the same config and seed on one machine;
- `config_fingerprint`: a hash of `config` (`config_fingerprint()`), so that a sweep can tell
  a result.json of this configuration from one copied or edited in;
- `artefacts`: what the run wrote beside its checkpoints and promises to keep (paths relative
  to the workdir, e.g. `merged` for a LoRA run's merged export); written before result.json,
  so result.json's presence means everything listed exists;
- `seed`, `config` (the resolved config), `versions` (Python, jax, jaxlib, flax,
  optax, orbax-checkpoint, ...), `git` (commit, and whether the tree had
  uncommitted changes), `device`, `finished_at`.

`comparable(result)` is the part that two runs of the same cell and seed on the
same machine must reproduce exactly (tests/test_sweep.py checks it).
"""
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import resource
import subprocess
import sys

import jax
import numpy as np

from gptlab import files
from gptlab import model as model_lib
from gptlab import perf
from gptlab.metrics import read_metrics

FILENAME = "result.json"
THROUGHPUT_KEYS = ("tokens_per_sec", "mfu")  # final-metric keys that measure speed, not the model
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections", "tensorflow-datasets")
# Sections that describe how and when a run was made rather than what it computed.
CIRCUMSTANCES = ("timing", "finished_at", "versions", "git", "device")


def write_result(workdir, final: dict, config_json: dict, params, trainable, wall_time_s: float,
                 resumed_from_step=None, train_data_tokens=None, optimizer_state_bytes=None,
                 data_examples=None, artefacts=(), tokens_seen=None) -> dict:
    """Writes WORKDIR/result.json for a finished run and returns it.

    `params` is the parameter tree (arrays or ShapeDtypeStructs) and `trainable`
    a bool tree of the same structure, or None when everything trains. `tokens_seen`: the input tokens
    the run processed, summed over its segments (a resume may change the batch); None: steps x batch x seq_len.
    """
    workdir = pathlib.Path(workdir)
    metrics = {k: v for k, v in final.items() if k not in THROUGHPUT_KEYS}
    data = config_json.get("data", {})
    step = int(final["step"])
    result = {
        **metrics,
        "best": best_metrics(read_metrics(workdir) + [metrics]),
        "params": param_counts(params, trainable),
        "steps": step,
        "train_data_tokens": None if train_data_tokens is None else int(train_data_tokens),
        "data_examples": data_examples,
        "optimizer_state_bytes": None if optimizer_state_bytes is None else int(optimizer_state_bytes),
        "tokens_seen": int(tokens_seen) if tokens_seen is not None else
        step * int(data.get("batch_size") or 0) * int(data.get("seq_len") or 0),
        "timing": {"wall_time_s": wall_time_s, "resumed_from_step": int(resumed_from_step or 0),
                   "peak_rss_mb": peak_rss_mb(),
                   **{k: final[k] for k in THROUGHPUT_KEYS if k in final}},
        "seed": config_json.get("seed"),
        "config": config_json,
        "config_fingerprint": config_fingerprint(config_json),
        "artefacts": sorted(str(a) for a in artefacts),
        "versions": versions(),
        "git": git_state(),
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
                   "count": jax.device_count(), "processes": jax.process_count(),
                   "host_cpu": perf.cpu_description()},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    files.write_json_atomic(workdir / FILENAME, result, default=_plain)  # a result.json is always whole
    return result


def config_fingerprint(config_json: dict) -> str:
    """A short hash of a resolved config (as JSON): equal for equal configs, whatever the key order."""
    text = json.dumps(config_json, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def promised_artefacts(result: dict) -> list:
    """What a finished run's workdir must hold besides result.json: the artefacts it lists, and for a
    LoRA run with `finetune.export_merged` (also one written before result.json listed them) `merged`."""
    promised = set(result.get("artefacts") or ())
    finetune = (result.get("config") or {}).get("finetune") or {}
    if finetune.get("strategy") == "lora" and finetune.get("export_merged") and (result.get("steps") or 0) > 0:
        promised.add("merged")
    return sorted(promised)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def read_result(workdir):
    """The run's result.json as a dict, or None while the run has not finished."""
    path = pathlib.Path(workdir) / FILENAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def comparable(result: dict) -> dict:
    """What a rerun of the same config and seed on the same machine reproduces exactly."""
    return {k: v for k, v in result.items() if k not in CIRCUMSTANCES}


def best_metrics(records) -> dict:
    """{name: {"value", "step"}}: the lowest of every loss, the highest of every accuracy."""
    best = {}
    for record in records:
        for name, value in record.items():
            higher = "accuracy" in name
            if not (name.endswith("loss") or higher) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if name not in best or (value > best[name]["value"] if higher else value < best[name]["value"]):
                best[name] = {"value": float(value), "step": int(record["step"])}
    return best


def param_counts(params, trainable) -> dict:
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)]
    trains = [True] * len(sizes) if trainable is None else [bool(t) for t in jax.tree.leaves(trainable)]
    total, count = sum(sizes), sum(s for s, t in zip(sizes, trains) if t)
    return {"total": total, "trainable": count, "frozen": total - count,
            "trainable_percent": 100.0 * count / total if total else 0.0,
            "non_embedding": model_lib.count_params(params, non_embedding=True)}


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.lru_cache(maxsize=None)
def git_state() -> dict:
    """The commit of the gptlab source tree and whether tracked files differ from it; None outside git."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                           timeout=30, env=env, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
