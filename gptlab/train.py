"""Training: one train state, one pure train step, one loop.

Start-up order (documented once, in `start_and_run`, used by every experiment):
resume this workdir's own latest checkpoint if there is one; otherwise
initialise (from scratch for pretraining, from `init_from` for fine-tuning).
"""
import dataclasses
import json
import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptlab import adapt
from gptlab import checkpoint as checkpoint_lib
from gptlab import dense_backward
from gptlab import files
from gptlab import lock as lock_lib
from gptlab import model as model_lib
from gptlab import metrics as metrics_lib
from gptlab import optim
from gptlab import parallel as parallel_lib
from gptlab import perf
from gptlab import progress as progress_lib
from gptlab import results
from gptlab import selection as selection_lib
from gptlab import tokenizers as tokenizers_lib
from gptlab.data import pipeline
from gptlab.errors import Preempted, UserError
from gptlab.metrics import MetricsWriter


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # raw key data (jax.random.key_data), so it checkpoints as a plain array


# A loss function: (params, batch, dropout_key or None) -> (summed loss, dict of sums incl. "count").
# Sums rather than means make gradient accumulation and data parallelism exact for any split,
# also when examples carry different numbers of target tokens (masked losses). Optional sums:
# "tokens" (input tokens processed, for throughput; default "count") and any metric to be
# averaged over "count" at evaluation (e.g. "accuracy" -> eval_accuracy).
LossFn = Callable[[Any, dict, Any], tuple]


def lm_loss_fn(model: model_lib.GPT) -> LossFn:
    """Next-token cross-entropy; `batch["weights"]` (0/1 per target), if present, masks targets."""

    def loss_fn(params, batch, dropout_key):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        logits = model.apply({"params": params}, inputs, deterministic=dropout_key is None, rngs=rngs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        weights = batch.get("weights", jnp.ones_like(losses))
        return jnp.sum(losses * weights), {"count": jnp.sum(weights), "tokens": jnp.float32(losses.size)}

    return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, axis_name=None, trainable=None):
    """The pure train step: (state, batch) -> (state, metrics). Compile it with jit or pmap.

    The batch is split into `grad_accum_steps` micro-batches along axis 0; loss
    and gradient sums are accumulated (and summed over `axis_name` under pmap)
    and divided by the total target count once, so the update depends only on
    the global batch. Dropout keys are fold_in(rng, step) (and micro-batch index).

    With a `trainable` bool tree (fine-tuning), gradients are taken only with
    respect to those parameters: the frozen ones enter the loss as constants, so
    autodiff computes no weight gradients for them (and no backward pass below
    the lowest trainable layer); `tx` sees zeros for them and they are carried
    into the new state untouched, bit for bit.
    """

    def split(params):  # (differentiated, constant) parts; None marks the other part's leaves
        if trainable is None:
            return params, None
        return (jax.tree.map(lambda p, t: p if t else None, params, trainable),
                jax.tree.map(lambda p, t: None if t else p, params, trainable))

    def join(diff, const):
        if const is None:
            return diff
        return jax.tree.map(lambda d, c: c if d is None else d, diff, const, is_leaf=lambda x: x is None)

    value_and_grad = jax.value_and_grad(
        lambda diff, const, batch, key: loss_fn(join(diff, const), batch, key), has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        diff, const = split(state.params)
        grad_fn = lambda batch, key: value_and_grad(diff, const, batch, key)
        if grad_accum_steps == 1:
            (loss_sum, sums), grads = grad_fn(batch, key)
        else:
            # Micro-batch i takes rows i, i+k, i+2k, ...: every device's rows spread evenly over
            # the micro-batches, so no device idles when the batch axis is sharded.
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                (loss, sums), grads = grad_fn(micro_batch, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(lambda: (*grad_fn(first, key)[0], diff)))
            (loss_sum, sums, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        if axis_name is not None:
            loss_sum, sums, grads = jax.lax.psum((loss_sum, sums, grads), axis_name)
        # A batch with nothing to learn (chat: no assistant token in any row) has zero loss and gradients:
        # dividing by 1 instead of 0 keeps them zero, never NaN.
        count = jnp.where(sums["count"] > 0, sums["count"], 1.0)
        grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
        full_grads = join(grads, jax.tree.map(jnp.zeros_like, const))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = join(optax.apply_updates(diff, split(updates)[0]), const)
        metrics = {"train_loss": loss_sum / count, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "tokens": sums.get("tokens", count)}
        # The loss's other scalar sums (DPO: reward margin, preference accuracy, ...) as per-count means.
        metrics.update({f"train_{k}": v / count for k, v in sums.items()
                        if k not in ("count", "tokens") and jnp.ndim(v) == 0})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(loss_fn: LossFn, axis_name=None):
    """(params, batch) -> summed loss and counts, dropout off; the host averages over batches."""

    def eval_step(params, batch):
        loss_sum, sums = loss_fn(params, batch, None)
        out = {"loss_sum": loss_sum, **sums}
        return jax.lax.psum(out, axis_name) if axis_name is not None else out

    return eval_step


def evaluate(eval_step, params, batches, prefix: str = "eval") -> dict:
    """Metrics over `batches` (see `metrics_from_sums`), keys starting with `prefix`_."""
    return metrics_from_sums(sum_batches(eval_step, params, batches), prefix)


def sum_batches(eval_step, params, batches) -> dict:
    totals = defaultdict(float)
    for batch in batches:
        for key, value in jax.device_get(eval_step(params, batch)).items():
            totals[key] = totals[key] + np.asarray(value, np.float64)
    return dict(totals)


def metrics_from_sums(totals: dict, prefix: str = "eval") -> dict:
    """Loss, perplexity, every other sum averaged per count, and from a summed `confusion`
    matrix (classification) the macro-averaged F1. The same at training time and in evaluate."""
    loss = float(totals["loss_sum"] / totals["count"])
    metrics = {f"{prefix}_loss": loss, f"{prefix}_perplexity": float(np.exp(min(loss, 700.0)))}
    for key, value in totals.items():
        if key == "confusion":
            metrics[f"{prefix}_macro_f1"] = macro_f1(value)
        elif key not in ("loss_sum", "count", "tokens"):
            metrics[f"{prefix}_{key}"] = float(value / totals["count"])
    return metrics


def macro_f1(confusion) -> float:
    """Unweighted mean over classes of F1 from a confusion matrix (rows: true, columns: predicted).

    A class that is neither present nor predicted counts as F1 = 0 only if it is present
    or predicted; classes absent from both are left out of the mean.
    """
    confusion = np.asarray(confusion, np.float64)
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    seen = (support + predicted) > 0
    f1 = np.divide(2 * true_pos, support + predicted, out=np.zeros_like(true_pos), where=seen)
    return float(f1[seen].mean()) if seen.any() else 0.0


def resolve_model_config(config, tokenizer) -> model_lib.GPTConfig:
    """The model config with vocab_size taken from the tokenizer when unset; validated."""
    vocab_size = config.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab_size} is smaller than the {tokenizer.kind} tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size}): leave it unset or raise it")
    try:
        return model_lib.GPTConfig.from_config(config.model, vocab_size=vocab_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_seq_len(config) -> int:
    if config.model.block_size < 1:
        raise UserError(f"model.block_size={config.model.block_size} must be positive")
    seq_len = config.data.seq_len or config.model.block_size
    if seq_len > config.model.block_size:
        raise UserError(f"data.seq_len={seq_len} exceeds the model's context model.block_size="
                        f"{config.model.block_size}: lower data.seq_len or raise model.block_size")
    if seq_len < 1:
        raise UserError(f"data.seq_len={seq_len} must be positive")
    return seq_len


def check_train_config(config) -> None:
    train, data = config.train, config.data
    for name in ("num_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "grad_accum_steps"):
        if name == "num_steps" and train.num_steps < 0:
            raise UserError(f"train.num_steps={train.num_steps} must be >= 0 (0: evaluate only)")
        if name != "num_steps" and getattr(train, name) < 1:
            raise UserError(f"train.{name}={getattr(train, name)} must be positive")
    selection_lib.check_config(config)
    if data.batch_size < 1:
        raise UserError(f"data.batch_size={data.batch_size} must be positive")
    if data.batch_size % train.grad_accum_steps:
        raise UserError(f"data.batch_size={data.batch_size} is not divisible by train.grad_accum_steps="
                        f"{train.grad_accum_steps}: make the global batch a multiple of the accumulation steps")
    if config.seed < 0:
        raise UserError(f"seed={config.seed} must be non-negative")
    resolve_seq_len(config)
    perf.StepProfiler(tuple(train.get("profile_steps") or ()), "")  # validates train.profile_steps
    optim.learning_rate_schedule(config.optimizer, train.num_steps)  # validates the schedule's fields
    if config.optimizer.weight_decay < 0:
        raise UserError(f"optimizer.weight_decay={config.optimizer.weight_decay} must be non-negative")
    # The model's own checks, before any data is read (the vocabulary size comes later);
    # "auto" fields are valid here, perf.resolve_auto fills them in for the machine.
    fields = {k: ("xla" if v == perf.AUTO else v) for k, v in config.model.items()}
    try:
        model_lib.GPTConfig.from_config(fields, vocab_size=config.model.vocab_size or 1)
    except ValueError as e:
        raise UserError(str(e)) from None


def rules_table(params, decay_mask) -> str:
    """Parameters grouped over layers (blocks_* collapsed), with shapes and the decay rule."""
    rows = {}
    for (path, leaf), decays in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(decay_mask)):
        name = model_lib.any_layer(optim.path_str(path))
        row = rows.setdefault(name, [tuple(leaf.shape), 0, decays])
        row[1] += 1
    width = max(len(n) for n in rows)
    lines = [f"  {'parameter'.ljust(width)}  {'shape':>14}  count  weight decay"]
    lines += [f"  {n.ljust(width)}  {str(s):>14}  {c:5d}  {'yes' if d else 'no'}" for n, (s, c, d) in rows.items()]
    return "\n".join(lines)


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
    return run_experiment(config, workdir, _train)


def run_experiment(config, workdir, experiment) -> dict:
    """Runs `experiment(config, workdir, checkpoints, log, is_main) -> final metrics` (`_train` for
    pretraining, `gptlab.finetune` for fine-tuning) with what all experiments share: checks,
    distributed start-up, a writable workdir and its checkpoint manager."""
    perf.start_cpu_devices(config)  # before anything starts JAX's backend
    check_train_config(config)
    parallel_lib.initialize_distributed(config.parallel)  # before anything touches devices
    enable_compilation_cache(config.train.get("compilation_cache_dir"))  # before anything is compiled
    is_main = jax.process_index() == 0
    log = Logger(is_main)
    perf.resolve_auto(config, log)  # "auto" speed settings, before the config is used or stored
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


def training_model(config, model_cfg: model_lib.GPTConfig) -> model_lib.GPT:
    """The model the train step differentiates.

    `model.dense_backward` (its "auto" resolved by `gptlab.perf` for the machine) picks,
    here and nowhere else, how its dense layers compute kernel gradients
    (`gptlab.dense_backward`); evaluation and sampling use the plain model.
    """
    name = perf.resolve_model_fields(config.model).get("dense_backward", "xla")
    return model_lib.GPT(model_cfg, dot_general=dense_backward.dot_general(name))


def pretrain_experiment(config, data, log, finetuning=None) -> "Experiment":
    """Model, optimizer and batches of pretraining; `data` has `tokenizer`, `train`, `eval_batches(n)`.

    The training loop and `gptlab.benchmark` (which may pass synthetic data) both start from it.
    Fine-tuning is this assembly plus `finetuning` (a `gptlab.finetune.Finetuning`): what it
    adds to the parameters (adapters, a task head), its loss, the mask of what trains, and
    the pretrained initialisation.
    """
    seq_len = resolve_seq_len(config)
    tokenizer = data.tokenizer
    model_cfg = resolve_model_config(config, tokenizer)
    model = training_model(config, model_cfg)

    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    init_params = lambda: model_lib.init_params(model_cfg, init_key)
    loss_fn = lm_loss_fn(model)
    if finetuning is not None:
        init_params, loss_fn = finetuning.init_params(model_cfg, init_key), finetuning.loss_fn(model)
    params = jax.eval_shape(init_params)  # shapes only
    schedule = optim.learning_rate_schedule(config.optimizer, config.train.num_steps)
    decay = optim.match_mask(params, config.optimizer.weight_decay_on, "optimizer.weight_decay_on")

    num_params = model_lib.count_params(params)
    log(f"model: {num_params / 1e6:.2f}M parameters (excluding position embeddings), "
        f"{model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, "
        f"context {model_cfg.block_size}, vocab {model_cfg.vocab_size}, {model_cfg.dtype} compute"
        + (finetuning.describe() if finetuning is not None else ""))
    if finetuning is None:
        trainable, tx = None, optim.adamw(config.optimizer, schedule, params)
        flops = model_lib.flops_per_token(model_cfg, num_params, seq_len)
        log(rules_table(params, decay))
    else:
        trainable, tx = finetuning.trainable(params, decay, schedule)
        flops = adapt.flops_per_token(params, trainable, model_cfg.n_layer, model_cfg.n_embd, seq_len)

    return Experiment(
        init_params=init_params, rng=jax.random.key_data(dropout_key),
        loss_fn=loss_fn, tx=tx, schedule=schedule, batches=data.train,
        eval_batches=data.eval_batches(config.train.eval_batches), tokenizer=tokenizer,
        config_json=resolved_config_json(config, model_cfg, seq_len), flops_per_token=flops, dtype=model_cfg.dtype,
        init_from=finetuning and finetuning.load,
        trainable=None if trainable is None or all(jax.tree.leaves(trainable)) else trainable,
        test_batches=test_batches(data, config.train.get("test_batches") or config.train.eval_batches),
        train_data_tokens=len(data.train_tokens) if hasattr(data, "train_tokens") else None,
        data_examples=data.split_sizes() if hasattr(data, "split_sizes") else None)


def test_batches(data, num_batches: int):
    """The test split's fixed batches, where the data has a test split (`data.test_split`), else None."""
    get = getattr(data, "test_batches", None)
    return get(num_batches) if get is not None else None


def resolved_config_json(config, model_cfg: model_lib.GPTConfig, seq_len: int) -> dict:
    """The config as run: vocab_size and seq_len filled in (WORKDIR/config.json, every checkpoint)."""
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.model.vocab_size = model_cfg.vocab_size
        resolved.data.seq_len = seq_len
    return json.loads(resolved.to_json_best_effort())


@dataclasses.dataclass
class Experiment:
    """What one experiment brings to the start-up and loop that every experiment shares."""
    init_params: Callable[[], Any]  # fresh parameters (random init); compiled into their placement
    rng: jax.Array  # the dropout key's data, folded with the step in every train step
    loss_fn: LossFn
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    batches: Any  # training batches; state()/restore() is the position stored in checkpoints
    eval_batches: list
    tokenizer: Any
    config_json: dict  # the resolved config
    flops_per_token: float
    dtype: str  # compute dtype, for the log
    init_from: Optional[Callable] = None  # (fresh state, abstract state) -> state holding pretrained parameters
    trainable: Any = None  # bool tree: differentiate and update only these parameters (None: all)
    test_batches: Optional[list] = None  # the test split's batches: the best checkpoint is scored there, at the end
    train_data_tokens: Optional[int] = None  # tokens the training split holds (after data.train_fraction)
    data_examples: Optional[dict] = None  # sft/classify: usable examples per split (after filtering to the window)
    # (final metrics) -> paths (relative to the workdir) of what the run writes beside its checkpoints, e.g. a LoRA
    # run's merged export: called on process 0 before result.json, so result.json's presence means they exist.
    write_artefacts: Optional[Callable] = None
    accepted: Optional[Callable[[], None]] = None  # writes the experiment's own files once the start is accepted


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
                                           train_cfg.get("early_stopping_patience", 0))
    abstract = parallel.abstract_state(state)
    # Input tokens a step processes; tokens_seen sums it over the run's segments (a resume may change the batch).
    step_tokens = int(config.data.batch_size) * int(exp.config_json["data"]["seq_len"])
    tokens_before, carried_losses = 0, []
    if latest is not None:
        state, items = checkpoints.restore(latest, abstract)
        state = parallel.place_restored(state)
        exp.batches.restore(items["data"])
        if items.get("selection"):
            stopping = selection_lib.EarlyStopping.from_json(items["selection"], stopping.metric, stopping.patience)
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
    final["selection"] = selection_record(config, checkpoints, stopping, final, log, lambda step: evaluate(
        eval_step, parallel.place_restored(checkpoints.restore(step, abstract)[0]).params, exp.test_batches,
        prefix="test") if exp.test_batches else None)
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


def init_and_compile(config, exp: Experiment, parallel: parallel_lib.Parallel, log=print) -> tuple:
    """(fresh train state in its placement, train_step, eval_step): what the loop and the benchmark run.

    The steps are compiled (lazily, at their first call) by `parallel.compile`; at its first call the
    train step also settles an automatic `parallel.cpu_reuse_memory` (`perf.limit_reuse_memory`).
    """
    tx = exp.tx
    if config.train.skip_nonfinite_steps:  # the loop counts skipped steps and gives up after a limit
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)

    def make_state():
        params = exp.init_params()
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), rng=exp.rng)

    state = parallel.init_state(make_state)
    train_step, eval_step = parallel.compile(
        lambda axis: make_train_step(exp.loss_fn, tx, exp.schedule, config.train.grad_accum_steps, axis_name=axis,
                                     trainable=exp.trainable),
        lambda axis: make_eval_step(exp.loss_fn, axis_name=axis))
    return state, perf.limit_reuse_memory(train_step, log), eval_step


def prefetched(config, batches, parallel: parallel_lib.Parallel):
    """`batches` read `data.prefetch` batches ahead and placed on the devices by a background thread.

    With `data.prefetch=0` it is `batches` itself. Either way `state()` is the position
    after the batches already handed to the loop, so checkpoints and resumes stay exact.
    """
    ahead = config.data.get("prefetch") or 0
    if ahead < 0:
        raise UserError(f"data.prefetch={ahead} must be >= 0 (0: no prefetching)")
    return pipeline.Prefetch(batches, ahead, parallel.prefetch_place) if ahead else batches


def enable_compilation_cache(cache_dir) -> None:
    """JAX's persistent compilation cache in `cache_dir` (None: off), so a restarted run skips compiling.

    Call before anything is compiled: JAX reads the setting at its first compilation.
    """
    if not cache_dir:
        return
    path = os.path.abspath(os.path.expanduser(cache_dir))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"train.compilation_cache_dir={cache_dir!r} cannot be created ({e.strerror}): "
                        "choose a writable directory or unset it") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # cache the steps, not tiny helpers


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
    peak, peak_source = perf.total_peak_tflops(train.peak_tflops)
    log(f"MFU is measured against {peak:.3g} TFLOP/s ({peak_source}); {dtype} compute")
    profiler = perf.StepProfiler(tuple(train.get("profile_steps") or ()),
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
        evals = evaluate(eval_step, state.params, eval_batches)
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
                evals = evaluate(eval_step, state.params, eval_batches)
                record.update(evals)
                new_best = stopping.update(step, evals)
            if record:
                writer.write(step, record)
                log(f"step {step:6d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in record.items()))
                final.update(record, step=step)
                progress.observe(record)
            progress.update(step)
            if stopping.stopped:
                log(f"early stopping at step {step}: {stopping.metric} has not improved on "
                    f"{stopping.best_value:.4f} (step {stopping.best_step}) for {stopping.evals_since_best} "
                    f"evaluations (train.early_stopping_patience={stopping.patience})")
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
        evals = evaluate(eval_step, state.params, eval_batches)
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
