"""Assembling an experiment from its config: checks, the model, optimizer, data and what the loop needs.

`pretrain_experiment` is the assembly pretraining, fine-tuning (`gptlab.finetune`) and the benchmark
start from; `init_and_compile` places and compiles it for the devices.
"""
import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptlab import adapt
from gptlab import dense_backward
from gptlab import model as model_lib
from gptlab import optim
from gptlab import parallel as parallel_lib
from gptlab import profiling
from gptlab import perf
from gptlab import selection as selection_lib
from gptlab.data import pipeline
from gptlab.errors import UserError
from gptlab import steps as steps_lib


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
    profiling.StepProfiler(tuple(train.get("profile_steps") or ()), "")  # validates train.profile_steps
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


def training_model(dense_backward_name, model_cfg: model_lib.GPTConfig) -> model_lib.GPT:
    """The model the train step differentiates.

    `model.dense_backward` (`dense_backward_name`, resolved from "auto" when the run started) picks,
    here and nowhere else, how its dense layers compute kernel gradients
    (`gptlab.dense_backward`); evaluation and sampling use the plain model.
    """
    name = perf.concrete("model.dense_backward", dense_backward_name or "xla")
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
    model = training_model(config.model.get("dense_backward"), model_cfg)

    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    init_params = lambda: model_lib.init_params(model_cfg, init_key)
    loss_fn = steps_lib.lm_loss_fn(model)
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


WHOLE_SPLIT = -1  # train.test_batches: score every example of the test split


def test_batches(data, num_batches: int):
    """The test split's fixed batches, where the data has a test split (`data.test_split`), else None.
    num_batches WHOLE_SPLIT (-1): the whole split (the data's test_batches(None))."""
    get = getattr(data, "test_batches", None)
    if num_batches is not None and num_batches < 0 and num_batches != WHOLE_SPLIT:
        raise UserError(f"train.test_batches={num_batches}: use a positive number of batches, "
                        "or -1 for the whole split")
    return get(None if num_batches == WHOLE_SPLIT else num_batches) if get is not None else None


def examples_in(batches) -> Optional[int]:
    """How many examples (rows with any positive weight; every row of unweighted lm windows) the batches score."""
    if not batches:
        return None
    count = 0
    for batch in batches:
        weights = batch.get("weights")
        if weights is None:
            count += len(next(iter(batch.values())))
        else:
            weights = np.asarray(weights).reshape(len(weights), -1)
            count += int((weights > 0).any(axis=1).sum())
    return count


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
    loss_fn: steps_lib.LossFn
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
    # (final metrics) -> fields added to result.json (fine-tuning's `breadth`): called on every process after the
    # best checkpoint is chosen and scored, before result.json, so a crash in it leaves the run resumable.
    extra_results: Optional[Callable[[dict], dict]] = None


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
        return steps_lib.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), rng=exp.rng)

    state = parallel.init_state(make_state)
    train_step, eval_step = parallel.compile(
        lambda axis: steps_lib.make_train_step(exp.loss_fn, tx, exp.schedule, config.train.grad_accum_steps,
                                               axis_name=axis, trainable=exp.trainable),
        lambda axis: steps_lib.make_eval_step(exp.loss_fn, axis_name=axis))
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
