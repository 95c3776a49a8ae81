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
- The experiment is pretraining's assembly (`experiment_lib.pretrain_experiment`) plus a
  `Finetuning`: what it adds to the parameters, the task's loss, the mask of what
  trains and the pretrained initialisation. Start-up and loop are pretraining's
  (`train.start_and_run`): a workdir with its own checkpoints resumes its full
  state instead of loading `init_from`.
- Masks and the optimizer live in `gptlab.adapt`, LoRA in `gptlab.lora`. A LoRA run ends by
  writing WORKDIR/merged/ (before result.json, which lists it among its `artefacts`): the
  adapters folded into plain kernels, a checkpoint that the plain model (and `init_from`) loads.

Tasks: `lm` (next-token loss on a narrow corpus), `sft` (loss on response tokens
only), `classify` (cross-entropy of `cls_head` on the last real token's final
hidden state; evaluation also reports accuracy), `chat` (conversations through the
chat template, loss on assistant turns only) and `dpo` (preference tuning); for
the last two see gptlab/chat/: the tokenizer gains the chat tokens and a model
without them grows its embedding (`gptlab.chat.vocab`, listed as `grown` in
restore.json and under `added_tokens` in trainable.json).
"""
import dataclasses
import json
import pathlib
import shutil

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gptlab import adapt
from gptlab import checkpoint as checkpoint_lib
from gptlab import files
from gptlab import lora
from gptlab import model as model_lib
from gptlab import optim
from gptlab import perf
from gptlab import tokenizers as tokenizers_lib
from gptlab import train
from gptlab import experiment as experiment_lib
from gptlab import steps as steps_lib
from gptlab.chat import data as chat_data
from gptlab.chat import dpo, template, vocab
from gptlab.chat import reference as chat_reference
from gptlab.data import pipeline, supervised
from gptlab.errors import UserError

TASKS = ("lm", "sft", "classify", "chat", "dpo")
CHAT_TASKS = ("chat", "dpo")  # tasks that render conversations with the chat template
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
    growth = vocab.chat_growth(source.tokenizer_json) if ft.task in CHAT_TASKS else None
    if growth is not None and resolved.model.vocab_size < growth[1]:  # room for the chat tokens
        resolved.model.vocab_size = growth[1]
    if ft.task == "dpo" and ft.dpo_loss not in dpo.LOSSES:
        raise UserError(f"unknown finetune.dpo_loss={ft.dpo_loss!r}: choose one of {dpo.LOSSES}")
    return resolved


# -- which parameters come from the checkpoint ------------------------------------------------


@dataclasses.dataclass
class RestorePlan:
    loaded: list  # paths read from the checkpoint
    initialised: list  # paths new in the fine-tuning model: LoRA adapters, the classification head
    untied: list  # the untied head's kernel, initialised as the tied token embedding^T
    left_out: list  # checkpoint paths the task does not use (the LM head when classifying, ...)
    grown: list = dataclasses.field(default_factory=list)  # loaded, then grown by rows for the chat tokens

    def to_json(self, source: Pretrained) -> dict:
        return {"init_from": str(source.directory / str(source.step)), "step": source.step,
                **dataclasses.asdict(self)}


def tied_embedding(shapes: dict):
    """The path of the token embedding that is also the head, if the head is tied to it."""
    return next((p for p, info in model_lib.describe_paths(shapes).items()
                 if info.is_head and info.role == "embedding"), None)


def plan_restore(stored: dict, target: dict, task: str, where: str, vocab_size: int = None) -> RestorePlan:
    """Matches the checkpoint's parameter shapes to the fine-tuning model's, by path.

    Every parameter of the fine-tuning model is loaded with its exact shape, or
    is one the strategy or task adds (LoRA adapters, the untied LM head, the
    classification head: what is not a parameter of the model itself); anything
    else is a UserError naming the parameter. With `vocab_size` (chat tokens added),
    the token embedding and an untied head may be smaller along the vocabulary axis:
    they are `grown`.
    """
    plan = RestorePlan([], [], [], [])
    own, stored_own = model_lib.describe_paths(target), model_lib.describe_paths(stored)
    embedding = tied_embedding(stored)
    fix = ("leave the model.* fields unset (None) to take the pretrained run's values, "
           "or choose a checkpoint of this architecture")
    axes = vocab.vocab_axes(target) if vocab_size else {}
    for path, shape in target.items():
        if path in stored and stored[path] == shape:
            plan.loaded.append(path)
        elif (path in axes and path in stored and shape[axes[path]] == vocab_size
              and stored[path][:axes[path]] + stored[path][axes[path] + 1:] == shape[:axes[path]] + shape[axes[path] + 1:]):
            plan.grown.append(path)
        elif (path in own and own[path].role == "head" and path not in stored and embedding
              and (stored[embedding] == shape[::-1] or (vocab_size and stored[embedding][1] == shape[0]))):
            plan.untied.append(path)
        elif path not in own:
            plan.initialised.append(path)
        elif path in stored:
            raise UserError(f"{where} does not fit the fine-tuning model: parameter {path} has shape "
                            f"{stored[path]} there but {shape} here; {fix}")
        else:
            raise UserError(f"{where} has no parameter {path}, which the fine-tuning model needs; {fix}")
    for path in stored:
        if path in target:
            continue
        is_lm_head = path in stored_own and stored_own[path].role == "head"
        unused_head = is_lm_head if task == "classify" else path.startswith(adapt.TASK_HEAD + "/")
        if unused_head:
            plan.left_out.append(path)
        elif lora.is_adapter(path):
            raise UserError(f"{where} holds LoRA adapter {path} (it is a LoRA fine-tuning run): use the merged "
                            "export it wrote, --config.finetune.init_from=THAT_RUN/merged")
        elif is_lm_head:
            raise UserError(f"{where} has an untied {path} but model.tie_embeddings=True: leave "
                            "model.tie_embeddings unset (None) or set it to False")
        else:
            raise UserError(f"{where} has parameter {path}, which the fine-tuning model lacks; {fix}")
    return plan


def init_params(model_cfg: model_lib.GPTConfig, task: str, num_classes, key, adapters=None) -> dict:
    """Fresh parameters of the fine-tuning model: the GPT, LoRA adapters (`adapters`, a `lora.LoRA`)
    and, for classify, `cls_head` in place of the unused LM head."""
    gpt_key, head_key, lora_key = jax.random.split(key, 3)
    params = model_lib.init_params(model_cfg, gpt_key)
    if adapters is not None:
        params = lora.add(params, adapters, lora_key)
    if task == "classify":  # the classifier reads hidden states
        heads = {p.split("/")[0] for p, info in model_lib.describe(params).items() if info.role == "head"}
        params = {k: v for k, v in params.items() if k not in heads}
        params[adapt.TASK_HEAD] = {
            "kernel": 0.02 * jax.random.normal(head_key, (model_cfg.n_embd, num_classes), jnp.dtype(model_cfg.param_dtype)),
            "bias": jnp.zeros((num_classes,), model_cfg.param_dtype)}
    return params


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
        log, is_main = train.start(config)
        final = train.run_experiment(config, workdir, lambda *args: _finetune(*args, source=source), log, is_main)
    finally:
        source.close()
    # The run exports before its result.json (`_finetune`); this covers a run finished before it did, whose
    # merged/ is missing (the sweep counts such a cell unfinished and reruns it).
    if (_exports_merged(config) and final["step"] > 0 and jax.process_index() == 0
            and not (pathlib.Path(workdir).expanduser() / "merged").exists()):  # one writer
        export_merged(workdir)
    return final


def _exports_merged(config) -> bool:
    return config.finetune.strategy == "lora" and config.finetune.export_merged


def _finetune(config, workdir, checkpoints, log, is_main, source: Pretrained) -> dict:
    """Pretraining's assembly and loop, with fine-tuning's data and `Finetuning` additions."""
    ft = config.finetune
    tokenizer = tokenizers_lib.from_json(source.tokenizer_json)
    seq_len = experiment_lib.resolve_seq_len(config)
    process = (jax.process_index(), jax.process_count())
    if ft.task == "lm":
        data, num_classes = pipeline.Data(config.data, seq_len, config.seed, tokenizer, *process, log=log), None
    elif ft.task in CHAT_TASKS:
        tokenizer, num_classes = template.with_chat_tokens(tokenizer), None
        reference = chat_reference.ReferenceModel(config.seed, source, log) if ft.task == "dpo" else None
        data = chat_data.ChatData(ft.task, config.data, seq_len, config.seed, tokenizer, *process, log=log,
                                  reference=reference)
        del reference  # its parameters are freed: training holds no second copy
    else:
        data = supervised.SupervisedData(ft.task, config.data, seq_len, config.seed, tokenizer, *process, log=log)
        num_classes = data.num_classes if ft.task == "classify" else None
    finetuning = Finetuning(config, source, workdir, log, is_main, num_classes)
    exp = experiment_lib.pretrain_experiment(config, data, log, finetuning)
    if _exports_merged(config):  # before result.json: a failed export leaves the run unfinished, resumable
        exp = dataclasses.replace(exp, write_artefacts=lambda final: [export_merged(workdir, log).name]
                                  if final["step"] > 0 else [])

    def accepted():  # written once the start passed every resume check: a refused start writes nothing
        if is_main:
            tokenizers_lib.save(tokenizer, workdir)  # like every run's workdir: the tokenizer beside the config
            finetuning.write_trainable()

    exp.accepted = accepted
    if ft.breadth:  # result.json's `breadth`: what fine-tuning costs the general model
        exp.extra_results = lambda final: {"breadth": breadth(config, workdir, source, final, log)}
    return train.start_and_run(config, workdir, checkpoints, log, is_main, exp)


# -- breadth: the pretraining corpus scored before and after ------------------------------------


def breadth(config, workdir, source: Pretrained, final: dict, log=print) -> dict:
    """The pretraining corpus's validation split scored as a language model by the restored pretrained
    parameters (`before`) and by the run's best checkpoint (`after`, the one scored on test).

    Both go through `gptlab.evaluate.lm_metrics` (what `experiments.evaluate` runs) on the pretraining run's
    own data config (dataset, filters, window, batch), so `before` equals
    `experiments.evaluate --workdir=PRETRAINED --step=STEP` and `after` equals `experiments.evaluate` of
    this run's best step with `--config.data.*` set to the pretraining corpus. A LoRA run is scored merged
    (`convert.load_workdir` folds the adapters in); a classifier is scored without its `cls_head`, with the
    pretrained LM head where the task dropped it.
    """
    from ml_collections import config_dict

    from gptlab import convert
    from gptlab import evaluate as evaluate_lib

    data_cfg = evaluate_lib.data_config(source.config, {})
    eval_cfg = config_dict.ConfigDict({"num_batches": config.finetune.breadth_batches})
    before = convert.load_workdir(source.workdir, source.step, strict=False)
    best = (final.get("selection") or {}).get("best_step")
    after = convert.load_workdir(workdir, int(final["step"]) if best is None else best, strict=False)
    scores = {}
    for name, loaded in (("before", before), ("after", language_model(after, before))):
        metrics = evaluate_lib.lm_metrics(loaded, data_cfg, eval_cfg, log)
        scores[name] = {"loss": metrics["loss"], "bits_per_byte": metrics["bits_per_byte"]}
        tokens = metrics["tokens"]
    log(f"breadth on {data_cfg.dataset}/{data_cfg.eval_split} ({tokens:,d} tokens): loss "
        f"{scores['before']['loss']:.4f} before (step {before.step} of {source.workdir}), "
        f"{scores['after']['loss']:.4f} after (step {after.step})")
    return {"dataset": data_cfg.dataset, "split": data_cfg.eval_split, "tokens": int(tokens), **scores}


def language_model(loaded, pretrained):
    """`loaded` as the plain GPT that `evaluate.lm_metrics` scores: a task head (`cls_head`) left out and the
    parameters the task dropped (an untied LM head) taken from `pretrained`, with its head tying."""
    params = dict(loaded.params)
    if adapt.TASK_HEAD not in params:
        return loaded
    del params[adapt.TASK_HEAD]
    cfg = dataclasses.replace(loaded.model_cfg, tie_embeddings=pretrained.model_cfg.tie_embeddings)
    for name, value in pretrained.params.items():
        params.setdefault(name, value)
    return dataclasses.replace(loaded, params=params, model_cfg=cfg)


class Finetuning:
    """What fine-tuning adds to pretraining's assembly (`experiment_lib.pretrain_experiment`): adapters and a
    task head on the parameters, the task's loss, the mask of what trains, and `init_from`'s weights."""

    def __init__(self, config, source: Pretrained, workdir, log, is_main: bool, num_classes):
        ft = self.ft = config.finetune
        self.config, self.source, self.workdir, self.log, self.is_main = config, source, workdir, log, is_main
        self.num_classes = num_classes
        self.adapters = lora.LoRA(ft.lora_rank, ft.lora_alpha, tuple(ft.lora_targets)) if ft.strategy == "lora" else None
        self.plan = self.model_cfg = None
        # (base vocabulary, with the chat tokens) when the task needs chat tokens the checkpoint lacks, else None
        self.growth = vocab.chat_growth(source.tokenizer_json) if ft.task in CHAT_TASKS else None

    def init_params(self, model_cfg: model_lib.GPTConfig, key):
        self.model_cfg = model_cfg
        return lambda: init_params(model_cfg, self.ft.task, self.num_classes, key, self.adapters)

    def loss_fn(self, model) -> steps_lib.LossFn:
        if self.adapters is not None:
            model = lora.Adapted(model, self.adapters.scale)
        if self.ft.task == "dpo":
            return dpo.loss_fn(model, self.ft.dpo_beta, self.ft.dpo_loss)
        return steps_lib.classify_loss_fn(model) if self.ft.task == "classify" else steps_lib.lm_loss_fn(model)

    def describe(self) -> str:
        return f"; task {self.ft.task}"

    def trainable(self, params, decay, schedule) -> tuple:
        """(mask of what trains, optimizer), after checking the checkpoint fits (before any training)."""
        ft = self.ft
        self.plan = plan_restore(self.source.shapes, checkpoint_lib.shapes_by_path(params), ft.task, self.source.where,
                                 self.model_cfg.vocab_size if self.growth else None)
        mask = adapt.trainable_mask(params, ft.strategy, self.model_cfg.n_layer, ft.last_k, tuple(ft.trainable))
        tx = adapt.optimizer(self.config.optimizer, schedule, params, mask)
        full_tx = optim.adamw(self.config.optimizer, schedule, params)
        summary = adapt.summarize(ft.strategy, params, mask, decay, jax.eval_shape(tx.init, params),
                                  jax.eval_shape(full_tx.init, params))
        self.log(f"fine-tuning strategy {ft.strategy}: what trains\n{summary.table}")
        self.summary = summary  # written to WORKDIR/trainable.json once the start is accepted (write_trainable)
        return mask, tx

    def write_trainable(self) -> None:
        """WORKDIR/trainable.json: what trains, and what the chat tokens added to the pretrained model."""
        record = self.summary.to_json()
        if self.growth:
            record["added_tokens"] = self.added_tokens()
        files.write_json_atomic(self.workdir / "trainable.json", record)

    def added_tokens(self) -> dict:
        base, size = self.growth
        return {"tokens": {t: base + i for i, t in enumerate(template.CHAT_TOKENS)},
                "vocab_size": {"pretrained": int(self.source.shapes["wte/embedding"][0]), "now": self.model_cfg.vocab_size},
                "grown": self.plan.grown, "rows_reset": [base, base + len(template.CHAT_TOKENS)],
                "init": "mean of the pretrained rows + Gaussian noise with their per-coordinate std (gptlab.chat.vocab)"}

    def load(self, state, abstract):
        """Pretrained parameters into the fresh state (whose optimizer state and step stay fresh)."""
        plan, source, log = self.plan, self.source, self.log
        fresh = flax.traverse_util.flatten_dict(state.params, sep="/")
        targets = flax.traverse_util.flatten_dict(abstract.params, sep="/")
        wanted = {p: targets[p] for p in plan.loaded}
        embedding = tied_embedding(source.shapes)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        for path in plan.grown + ([embedding] if plan.untied and embedding not in wanted else []):
            wanted[path] = jax.ShapeDtypeStruct(source.shapes[path], source.dtypes[path], sharding=device)
        loaded = flax.traverse_util.flatten_dict(
            source.restore_params(flax.traverse_util.unflatten_dict(wanted, sep="/")), sep="/")
        if self.growth:  # rows for the chat tokens: the same function builds the DPO reference model
            loaded = vocab.grow_params(loaded, self.growth[0], self.model_cfg.vocab_size,
                                       len(template.CHAT_TOKENS), self.config.seed)
            log(f"chat tokens {', '.join(template.CHAT_TOKENS)} at ids {self.growth[0]}-{self.growth[1] - 1}: "
                + ", ".join(f"{p} {source.shapes[p]} -> {tuple(loaded[p].shape)}" for p in vocab.vocab_axes(loaded))
                + "; their rows set to the mean of the pretrained rows plus noise of their standard deviation")
        reshaped = vocab.vocab_axes(loaded) if self.growth else {}  # grown or reset on one device: placed again
        fresh.update({p: _place_like(loaded[p], fresh[p]) if p in reshaped else loaded[p]
                      for p in plan.loaded + plan.grown})
        for path in plan.untied:
            fresh[path] = _place_like(jnp.transpose(jnp.asarray(loaded[embedding])), fresh[path])
        size = sum(int(np.prod(source.shapes[p])) for p in plan.loaded + plan.grown)
        log(f"init_from {source.directory / str(source.step)} (step {source.step}, read-only): loaded "
            f"{len(plan.loaded + plan.grown)} parameter arrays ({size:,d} values): "
            + ", ".join(adapt.collapse_paths(plan.loaded + plan.grown)))
        if plan.initialised:
            log("  initialised fresh: " + ", ".join(adapt.collapse_paths(plan.initialised)))
        if plan.untied:
            log(f"  untied head: {', '.join(plan.untied)} initialised as {embedding}^T (the model starts equal; "
                "the head now trains apart from the input embedding)")
        if plan.left_out:
            log(f"  not loaded (unused by task {self.ft.task}): " + ", ".join(plan.left_out))
        if self.is_main:
            (self.workdir / "restore.json").write_text(json.dumps(plan.to_json(source), indent=2) + "\n")
        return state.replace(params=flax.traverse_util.unflatten_dict(fresh, sep="/"))


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
    merged = run.params  # load_workdir merges a LoRA run's adapters into their kernels
    config = {**run.config, "merged_lora_from": str(workdir)}
    fresh = workdir / "merged.tmp"  # written apart, then swapped in: a crash never leaves a half export
    shutil.rmtree(fresh, ignore_errors=True)  # an earlier attempt's leftover
    try:
        directory = convert.save_workdir(fresh, jax.tree.map(np.asarray, merged), config, run.tokenizer_spec,
                                         source=f"lora-merge:{workdir}", step=run.step)
        shutil.rmtree(out, ignore_errors=True)
        fresh.rename(out)
    except (OSError, UserError) as e:
        shutil.rmtree(fresh, ignore_errors=True)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise UserError(f"could not write the merged export {out} ({reason}); the run's own checkpoints are intact "
                        "and the run does not count as finished without it: free disk space or fix the directory's "
                        "permissions, then rerun the same command, which exports it again") from None
    log(f"merged export: LoRA adapters folded into their kernels, plain-model checkpoint at "
        f"{out / directory.relative_to(fresh)}")
    return out
