"""Fine-tuning: a pretrained GPT specialised on narrow data through Optax masks.

    python -m experiments.finetune --config=configs/finetune.py:lora --workdir=/tmp/ft \\
        --config.finetune.init_from=/tmp/run

- `finetune.init_from` is a pretraining workdir (its latest checkpoint), one
  `checkpoints/STEP` directory, or `WORKDIR/best` (its best checkpoint by
  validation), opened read-only: nothing is ever written there.
  The model config and tokenizer are that run's; a `model.*` field set in the
  fine-tuning config overrides the stored one, and one that changes a
  pretrained parameter's shape is an error. Only parameters are loaded; the
  optimizer state and step counter start fresh.
- The fine-tuning model is the pretrained GPT plus what strategy and task add:
  LoRA adapters (`lora`), an untied `lm_head` initialised as `wte^T` (when
  `model.tie_embeddings=False` meets a tied checkpoint, so a head-only probe does
  not also move the input embedding), and a classification head `cls_head`
  (task `classify`). The restore logs, and writes to WORKDIR/restore.json, which
  parameters were loaded, which initialised, and which were left out.
- Start-up and loop are pretraining's (`train.start_and_run`): a workdir with
  its own checkpoints resumes its full state instead of loading `init_from`.
- Masks, optimizer and the LoRA merge live in `gptlab.adapt`. A LoRA run ends by
  writing WORKDIR/merged/: the adapters folded into plain kernels, a checkpoint
  that the plain model (and `init_from`) loads.

Tasks: `lm` (next-token loss on a narrow corpus), `sft` (loss on response tokens
only), `classify` (cross-entropy of `cls_head` on the last real token's final
hidden state; evaluation also reports accuracy).
"""
import dataclasses
import json
import pathlib
import shutil

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptlab import adapt
from gptlab import checkpoint as checkpoint_lib
from gptlab import model as model_lib
from gptlab import optim
from gptlab import perf
from gptlab import tokenizers as tokenizers_lib
from gptlab import train
from gptlab.data import pipeline, supervised
from gptlab.errors import UserError

TASKS = ("lm", "sft", "classify")
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
_FIX = ("pass a pretraining workdir (the folder holding checkpoints/) or one of its checkpoints/STEP "
        "directories: --config.finetune.init_from=PATH")


class Pretrained:
    """A gptlab checkpoint opened read-only: a run's workdir (its latest step) or one step directory."""

    def __init__(self, path):
        if not path:
            raise UserError(f"finetune.init_from is not set: {_FIX}")
        given = pathlib.Path(path).expanduser().absolute()
        if given.name == "best" and not given.exists():  # WORKDIR/best or WORKDIR/checkpoints/best
            checkpoints = given.parent if given.parent.name == "checkpoints" else given.parent / "checkpoints"
            best = checkpoint_lib.resolve_step(checkpoints, "best", f"finetune.init_from={path}")
            given = checkpoints / str(best)
        if not given.exists():
            raise UserError(f"finetune.init_from={path} does not exist: {_FIX}")
        step = None
        if (given / "checkpoints").is_dir():
            directory = given / "checkpoints"
        elif given.name == "checkpoints" and given.is_dir():
            directory = given
        elif given.name.isdigit() and (given / "state").is_dir():
            directory, step = given.parent, int(given.name)
        else:
            raise UserError(f"finetune.init_from={path} is not a gptlab checkpoint: {_FIX}")
        self.directory = directory
        self.workdir = directory.parent  # the run that wrote it; fine-tuning never writes there
        steps = checkpoint_lib.complete_steps(directory)
        if step is None and not steps:
            raise UserError(f"finetune.init_from={path} has no finished checkpoint in {directory}: "
                            f"let its pretraining save one (train.checkpoint_every), or {_FIX}")
        if step is not None and step not in steps:
            raise UserError(f"finetune.init_from={path} is not a finished checkpoint (finished steps in "
                            f"{directory}: {steps}): {_FIX}")
        try:  # read-only, and pinned: the pretraining run may still be rotating its checkpoints
            self.reader = checkpoint_lib.Reader(directory, step)
        except checkpoint_lib.CorruptCheckpoint as e:
            raise UserError(f"finetune.init_from {e}: {_FIX}") from None
        self.step = self.reader.step
        self.where = f"finetune.init_from checkpoint {directory / str(self.step)}"
        self.config, self.tokenizer_json = self.reader.config, self.reader.tokenizer
        if not isinstance(self.config.get("model"), dict):
            self.close()
            raise UserError(f"{self.where} stores no model config: it was not written by gptlab; {_FIX}")
        stored = self.reader.stored["params"]
        self.shapes = checkpoint_lib.shapes_by_path(stored)
        self.dtypes = {optim.path_str(p): np.dtype(m.dtype) for p, m in jax.tree_util.tree_leaves_with_path(stored)}

    def restore_params(self, template: dict) -> dict:
        """The parameters named by the nested dict `template`, restored into its leaves' placement
        (ShapeDtypeStructs with shardings, or numpy arrays) and dtypes; nothing else is read."""
        try:
            return self.reader.restore_params(template)
        except checkpoint_lib.CorruptCheckpoint as e:
            raise UserError(f"finetune.init_from {e}; point finetune.init_from at an earlier "
                            "checkpoints/STEP") from None

    def close(self) -> None:
        self.reader.close()


def resolve_config(config, source: Pretrained):
    """The config with every unset (None) `model.*` field and `data.tokenizer` taken from `source`."""
    ft = config.finetune
    if ft.strategy not in adapt.STRATEGIES:
        raise UserError(f"unknown finetune.strategy={ft.strategy!r}: choose one of {adapt.STRATEGIES}")
    if ft.task not in TASKS:
        raise UserError(f"unknown finetune.task={ft.task!r}: choose one of {TASKS}")
    stored = source.config["model"]
    resolved = config.copy_and_resolve_references()
    for name in resolved.model:
        if resolved.model[name] is None and stored.get(name) is not None:
            resolved.model[name] = stored[name]
    missing = [name for name in SHAPE_FIELDS if resolved.model[name] is None]
    if missing:
        raise UserError(f"{source.where} stores no model.{missing[0]}: set --config.model.{missing[0]}")
    kind = source.tokenizer_json.get("kind")
    if resolved.data.tokenizer is None:
        resolved.data.tokenizer = kind
    elif resolved.data.tokenizer != kind:
        raise UserError(f"data.tokenizer={resolved.data.tokenizer} differs from the pretrained run's {kind} "
                        "tokenizer: leave data.tokenizer unset (None) to use the pretrained one")
    return resolved


# -- which parameters come from the checkpoint ------------------------------------------------


@dataclasses.dataclass
class RestorePlan:
    loaded: list  # paths read from the checkpoint
    initialised: list  # paths new in the fine-tuning model: LoRA adapters, the classification head
    untied: list  # lm_head/kernel initialised as wte/embedding^T
    left_out: list  # checkpoint paths the task does not use (the LM head when classifying, ...)

    def to_json(self, source: Pretrained) -> dict:
        return {"init_from": str(source.directory / str(source.step)), "step": source.step,
                **dataclasses.asdict(self)}


def _is_new(path: str) -> bool:
    return path.startswith("cls_head/") or path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")


def plan_restore(stored: dict, target: dict, task: str, where: str) -> RestorePlan:
    """Matches the checkpoint's parameter shapes to the fine-tuning model's, by path.

    Every parameter of the fine-tuning model is loaded with its exact shape, or
    is one the strategy or task adds (LoRA adapters, the untied LM head, the
    classification head); anything else is a UserError naming the parameter.
    """
    plan = RestorePlan([], [], [], [])
    fix = ("leave the model.* fields unset (None) to take the pretrained run's values, "
           "or choose a checkpoint of this architecture")
    for path, shape in target.items():
        if path in stored and stored[path] == shape:
            plan.loaded.append(path)
        elif path == "lm_head/kernel" and path not in stored and stored.get("wte/embedding") == shape[::-1]:
            plan.untied.append(path)
        elif _is_new(path):
            plan.initialised.append(path)
        elif path in stored:
            raise UserError(f"{where} does not fit the fine-tuning model: parameter {path} has shape "
                            f"{stored[path]} there but {shape} here; {fix}")
        else:
            raise UserError(f"{where} has no parameter {path}, which the fine-tuning model needs; {fix}")
    for path in stored:
        if path in target:
            continue
        unused_head = path.startswith("lm_head/") if task == "classify" else path.startswith("cls_head/")
        if unused_head:
            plan.left_out.append(path)
        elif _is_new(path):
            raise UserError(f"{where} holds LoRA adapter {path} (it is a LoRA fine-tuning run): use the merged "
                            "export it wrote, --config.finetune.init_from=THAT_RUN/merged")
        elif path.startswith("lm_head/"):
            raise UserError(f"{where} has an untied {path} but model.tie_embeddings=True: leave "
                            "model.tie_embeddings unset (None) or set it to False")
        else:
            raise UserError(f"{where} has parameter {path}, which the fine-tuning model lacks; {fix}")
    return plan


def init_params(model_cfg: model_lib.GPTConfig, task: str, num_classes, key) -> dict:
    """Fresh parameters of the fine-tuning model: the GPT (with any LoRA adapters) and, for
    classify, `cls_head` in place of the unused LM head."""
    gpt_key, head_key = jax.random.split(key)
    params = model_lib.init_params(model_cfg, gpt_key)
    if task == "classify":
        params = {k: v for k, v in params.items() if k != "lm_head"}  # the classifier reads hidden states
        params["cls_head"] = {
            "kernel": 0.02 * jax.random.normal(head_key, (model_cfg.n_embd, num_classes), jnp.dtype(model_cfg.param_dtype)),
            "bias": jnp.zeros((num_classes,), model_cfg.param_dtype)}
    return params


def classify_loss_fn(model: model_lib.GPT) -> train.LossFn:
    """Cross-entropy of `cls_head` on the final hidden state of each row's last real token (GPT-1)."""

    def loss_fn(params, batch, dropout_key):
        body = {k: v for k, v in params.items() if k != "cls_head"}
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        hidden = model.apply({"params": body}, batch["tokens"], deterministic=dropout_key is None, rngs=rngs,
                             return_hidden=True)
        last = jnp.take_along_axis(hidden, (batch["lengths"] - 1)[:, None, None], axis=1)[:, 0]
        head = params["cls_head"]
        logits = last.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        weights = batch["weights"]
        predicted = jnp.argmax(logits, axis=-1)
        correct = (predicted == batch["labels"]).astype(jnp.float32)
        num_classes = logits.shape[-1]  # confusion[true, predicted]: macro-F1 at evaluation (train.evaluate)
        confusion = (jax.nn.one_hot(batch["labels"], num_classes) * weights[:, None]).T @ jax.nn.one_hot(
            predicted, num_classes)
        return jnp.sum(losses * weights), {"count": jnp.sum(weights), "accuracy": jnp.sum(correct * weights),
                                           "confusion": confusion, "tokens": jnp.float32(batch["tokens"].size)}

    return loss_fn


def _place_like(value, template):
    """`value` with the placement and dtype of `template` (a sharded jax.Array or a host array)."""
    if isinstance(template, jax.Array):
        return jax.device_put(jnp.asarray(value, template.dtype), template.sharding)
    return np.asarray(value, template.dtype)


# -- the experiment ---------------------------------------------------------------------------


def finetune_and_evaluate(config, workdir) -> dict:
    """Fine-tunes `finetune.init_from` as `config` says, writing into `workdir`; returns final metrics."""
    perf.start_cpu_devices(config)  # before reading the checkpoint can start JAX's backend
    source = Pretrained(config.finetune.init_from)
    try:
        target = pathlib.Path(workdir).expanduser().absolute()
        if target == source.workdir or source.workdir in target.parents:
            raise UserError(f"--workdir={workdir} is inside the pretraining run {source.workdir}, which fine-tuning "
                            "never writes to: choose a --workdir outside it")
        config = resolve_config(config, source)
        final = train.run_experiment(
            config, workdir, lambda *args: _finetune(*args, source=source))
    finally:
        source.close()
    if (config.finetune.strategy == "lora" and config.finetune.export_merged and final["step"] > 0
            and jax.process_index() == 0):  # one writer
        export_merged(workdir)
    return final


def _finetune(config, workdir, checkpoints, log, is_main, source: Pretrained) -> dict:
    ft = config.finetune
    tokenizer = tokenizers_lib.from_json(source.tokenizer_json)
    seq_len = train.resolve_seq_len(config)
    model_cfg = train.resolve_model_config(config, tokenizer)
    if ft.strategy == "lora":
        if ft.lora_rank < 1:
            raise UserError(f"finetune.lora_rank={ft.lora_rank}: LoRA needs a rank of at least 1 (typical: 4-16)")
        model_cfg = dataclasses.replace(model_cfg, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha,
                                        lora_targets=tuple(ft.lora_targets))
        adapt.check_lora_targets(jax.eval_shape(
            lambda: model_lib.init_params(dataclasses.replace(model_cfg, lora_rank=0), jax.random.key(0))),
            model_cfg.lora_targets)
    process = (jax.process_index(), jax.process_count())
    if ft.task == "lm":
        data, num_classes = pipeline.Data(config.data, seq_len, config.seed, tokenizer, *process, log=log), None
    else:
        data = supervised.SupervisedData(ft.task, config.data, seq_len, config.seed, tokenizer, *process, log=log)
        num_classes = data.num_classes if ft.task == "classify" else None

    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    make_params = lambda: init_params(model_cfg, ft.task, num_classes, init_key)
    params = jax.eval_shape(make_params)  # shapes only
    plan = plan_restore(source.shapes, checkpoint_lib.shapes_by_path(params), ft.task, source.where)  # fails before any training
    trainable = adapt.trainable_mask(params, ft.strategy, model_cfg.n_layer, ft.last_k, tuple(ft.trainable))
    schedule = optim.learning_rate_schedule(config.optimizer, config.train.num_steps)
    tx = adapt.optimizer(config.optimizer, schedule, params, trainable)
    decay = optim.match_mask(params, config.optimizer.weight_decay_on, "optimizer.weight_decay_on")
    full_tx = optim.adamw(config.optimizer, schedule, params)
    summary = adapt.summarize(ft.strategy, params, trainable, decay, jax.eval_shape(tx.init, params),
                              jax.eval_shape(full_tx.init, params))
    num_params = model_lib.count_params(params)
    log(f"model: {num_params / 1e6:.2f}M parameters (excluding position embeddings), {model_cfg.n_layer} layers, "
        f"{model_cfg.n_head} heads, {model_cfg.n_embd} wide, context {model_cfg.block_size}, "
        f"vocab {model_cfg.vocab_size}, {model_cfg.dtype} compute; task {ft.task}")
    log(f"fine-tuning strategy {ft.strategy}: what trains\n{summary.table}")
    if is_main:
        summary.write(workdir / "trainable.json")
        tokenizers_lib.save(tokenizer, workdir)  # like every run's workdir: the tokenizer beside the config

    def load_pretrained(state, abstract):
        """Pretrained parameters into the fresh state (whose optimizer state and step stay fresh)."""
        fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
        targets = flax.traverse_util.flatten_dict(abstract.params, sep="/")
        template = flax.traverse_util.unflatten_dict({p: targets[p] for p in plan.loaded}, sep="/")
        loaded = flax.traverse_util.flatten_dict(source.restore_params(template), sep="/")
        fresh.update(loaded)
        for path in plan.untied:
            fresh[path] = _place_like(jnp.transpose(jnp.asarray(loaded["wte/embedding"])), fresh[path])
        size = sum(int(np.prod(source.shapes[p])) for p in plan.loaded)
        log(f"init_from {source.directory / str(source.step)} (step {source.step}, read-only): loaded "
            f"{len(plan.loaded)} parameter arrays ({size:,d} values): " + ", ".join(adapt.collapse_paths(plan.loaded)))
        if plan.initialised:
            log("  initialised fresh: " + ", ".join(adapt.collapse_paths(plan.initialised)))
        if plan.untied:
            log("  untied head: lm_head/kernel initialised as wte/embedding^T (the model starts equal; "
                "the head now trains apart from the input embedding)")
        if plan.left_out:
            log(f"  not loaded (unused by task {ft.task}): " + ", ".join(plan.left_out))
        if is_main:
            (workdir / "restore.json").write_text(json.dumps(plan.to_json(source), indent=2) + "\n")
        return state.replace(params=flax.traverse_util.unflatten_dict(fresh, sep="/"))

    model = model_lib.GPT(model_cfg)
    loss_fn = classify_loss_fn(model) if ft.task == "classify" else train.lm_loss_fn(model)
    return train.start_and_run(config, workdir, checkpoints, log, is_main, train.Experiment(
        init_params=make_params, rng=jax.random.key_data(dropout_key), loss_fn=loss_fn, tx=tx, schedule=schedule,
        batches=data.train, eval_batches=data.eval_batches(config.train.eval_batches), tokenizer=tokenizer,
        config_json=train.resolved_config_json(config, model_cfg, seq_len),
        flops_per_token=adapt.flops_per_token(params, trainable, model_cfg.n_layer, model_cfg.n_embd, seq_len),
        dtype=model_cfg.dtype,
        init_from=load_pretrained, trainable=None if all(jax.tree.leaves(trainable)) else trainable,
        test_batches=train.test_batches(data, config.train.eval_batches)))


def export_merged(workdir, log=print):
    """Writes WORKDIR/merged/: the best checkpoint's (else the latest's) LoRA adapters folded into plain kernels.

    The result is a checkpoint of the plain model (lora_rank=0) with the
    pretraining layout, so `init_from`, sampling and evaluation load it like any
    other; its logits equal the adapted model's up to float rounding. An export of
    an older step (the run was resumed and trained on) is replaced.
    """
    from gptlab import convert  # reads and writes parameters-only checkpoints with the pretraining layout

    workdir = pathlib.Path(workdir).expanduser().absolute()
    out = workdir / "merged"
    best = checkpoint_lib.best_step(workdir / "checkpoints")  # the kept model: the best by validation, if any
    run = convert.load_workdir(workdir, best, strict=False)  # integrity-checked
    if convert.checkpoint_steps(out / "checkpoints") == [run.step]:
        log(f"merged export: {out} already holds step {run.step}")
        return out
    merged, _ = adapt.merge_lora(run.params, run.model_cfg)
    config = {**run.config, "merged_lora_from": str(workdir)}
    fresh = workdir / "merged.tmp"  # written apart, then swapped in: a crash never leaves a half export
    shutil.rmtree(fresh, ignore_errors=True)
    directory = convert.save_workdir(fresh, jax.tree.map(np.asarray, merged), config, run.tokenizer_spec,
                                     source=f"lora-merge:{workdir}", step=run.step)
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    log(f"merged export: LoRA adapters folded into their kernels, plain-model checkpoint at "
        f"{out / directory.relative_to(fresh)}")
    return out
