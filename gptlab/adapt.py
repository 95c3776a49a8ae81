"""What fine-tuning trains: strategies as masks over parameter paths, and an optimizer
that leaves every frozen parameter exactly where it was.

A strategy is a bool tree with the params' structure; `finetune.trainable` adds
regexes (`re.fullmatch` on `/`-joined parameter paths, as everywhere in gptlab,
through `gptlab.optim.match_mask`, so a regex that matches nothing is an error naming it).

| strategy    | trains                                                         |
| ----------- | -------------------------------------------------------------- |
| `full`      | every parameter                                                |
| `head`      | the output head only (a linear probe)                          |
| `last_k`    | the last k blocks, the final LayerNorm and the head            |
| `bitfit`    | biases only (Ben Zaken et al., 2021)                           |
| `layernorm` | norm scales and biases only (LayerNorm or RMSNorm)             |
| `lora`      | the low-rank adapters `lora_a`/`lora_b` only (Hu et al., 2021)  |
| `regex`     | the parameters matching `finetune.trainable`                   |

Which parameters are "the head", "biases", "norms" or "the last k blocks" is what the
model says about its parameters (`gptlab.model.describe`), so the strategies hold for
every architecture it builds. "The head" is `lm_head` when the model has one, the
token embedding `wte` when the head is tied to it (training it then also moves the
input embedding; fine-tuning unties it by default, see configs/finetune.py), and
`cls_head` for classification. A freshly initialised `cls_head` always trains,
whatever the strategy.
"""
import dataclasses
from typing import Sequence

import jax
import optax

from gptlab import lora
from gptlab import model as model_lib
from gptlab import optim
from gptlab.errors import UserError

STRATEGIES = ("full", "head", "last_k", "bitfit", "layernorm", "lora", "regex")
TASK_HEAD = "cls_head"  # the classification head fine-tuning adds (gptlab.finetune)


def _selects(strategy: str, paths, infos: dict, n_layer: int, last_k: int) -> set:
    """The paths `strategy` itself trains (without finetune.trainable and a task head)."""
    if strategy == "full":
        return set(paths)
    if strategy == "head":
        return {p for p, info in infos.items() if info.is_head}
    if strategy == "last_k":
        if not 1 <= last_k <= n_layer:
            raise UserError(f"finetune.last_k={last_k} does not fit the model's {n_layer} layers: "
                            f"choose 1 <= last_k <= {n_layer}")
        if any(info.stage == "block" and info.layer is None for info in infos.values()):
            raise UserError("finetune.strategy=last_k selects blocks, but model.scan_layers=True stacks them into "
                            "one array each: set --config.model.scan_layers=False to fine-tune the last blocks")
        return {p for p, info in infos.items() if info.is_head or info.stage == "output"
                or (info.stage == "block" and info.layer >= n_layer - last_k)}
    if strategy == "bitfit":
        biases = {p for p, info in infos.items() if info.leaf == "bias"}
        if not biases:
            raise UserError("finetune.strategy=bitfit trains biases, but this model has none (model.bias=False): "
                            "choose another strategy, e.g. layernorm or lora")
        return biases
    if strategy == "layernorm":
        return {p for p, info in infos.items() if info.role == "norm"}
    if strategy == "lora":
        adapters = {p for p in paths if lora.is_adapter(p)}
        if not adapters:
            raise UserError("finetune.strategy=lora, but the model has no LoRA adapters: set finetune.lora_rank > 0 "
                            "and finetune.lora_targets to kernels of dense layers")
        return adapters
    return set()  # regex: only finetune.trainable


def trainable_mask(params, strategy: str, n_layer: int, last_k: int = 2, trainable: Sequence[str] = ()):
    """A bool tree with `params`' structure: True where fine-tuning with `strategy` trains.

    The strategy's own parameters (from the model's description of them), a new task
    head, and whatever the regexes `trainable` match (each must match something).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown finetune.strategy={strategy!r}: choose one of {STRATEGIES}")
    if strategy == "regex" and not trainable:
        raise UserError("finetune.strategy=regex needs finetune.trainable, a tuple of regexes over parameter "
                        "paths, e.g. --config.finetune.trainable=\"('blocks_3/.*', 'ln_f/.*')\"")
    paths = optim.param_paths(params)
    infos = model_lib.describe(params)
    task_head = {p for p in paths if p.startswith(TASK_HEAD + "/")}
    if task_head:  # the task's head replaces the LM head: "the head" is the task's
        infos = {p: dataclasses.replace(info, is_head=False) for p, info in infos.items()}
    chosen = _selects(strategy, paths, infos, n_layer, last_k)
    chosen |= task_head  # a new, random head must learn
    what = "finetune.trainable" if strategy == "regex" else f"finetune.strategy={strategy} (+ finetune.trainable)"
    extra = jax.tree.leaves(optim.match_mask(params, tuple(trainable), what)) if trainable else [False] * len(paths)
    return jax.tree.unflatten(jax.tree.structure(params), [p in chosen or bool(e) for p, e in zip(paths, extra)])


def optimizer(opt_cfg, schedule: optax.Schedule, params, trainable) -> optax.GradientTransformation:
    """AdamW (`gptlab.optim.adamw`: clipping, decay on `weight_decay_on`) for the trainable
    parameters; `set_to_zero` for the frozen ones.

    `optax.partition` hands each branch only its own leaves, so no Adam moments are
    allocated for frozen parameters and weight decay, which lives inside the
    trainable branch, can never move one (`optax.masked` alone freezes nothing:
    leaves outside its mask pass their raw gradient through).
    """
    adamw = optim.adamw(opt_cfg, schedule, params)
    if all(jax.tree.leaves(trainable)):
        return adamw
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable)
    return optax.partition({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)


def flops_per_token(params, trainable, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token when only `trainable` parameters learn (for MFU).

    Forward: 2 per matrix parameter plus attention (4 * n_layer * seq_len * n_embd).
    Activation gradients: the same again plus twice the attention, but only for the
    layers at and above the lowest one that holds a trainable parameter (a head-only
    probe needs no backward pass through the body). Weight gradients: 2 per trainable
    parameter. With everything trainable and a tied head this is exactly
    `gptlab.model.flops_per_token`'s 6N + 12 * n_layer * seq_len * n_embd (which
    counts an untied token embedding as a matmul too). Position embeddings are not
    counted (a lookup), nor the token embedding when a classifier replaces the LM head.
    Adapters count with the block they sit in; stacked (scanned) blocks as block 0.
    """
    classify = any(p.startswith(TASK_HEAD + "/") for p in optim.param_paths(params))
    infos = model_lib.describe(params)

    def layer(path):  # -1: embeddings, 0..n_layer-1: blocks, n_layer: final norm and the heads
        info = infos.get(path) or infos.get(path.rsplit("/", 1)[0] + "/kernel")  # an adapter: its kernel's
        if info is None:
            return n_layer  # a task head
        return {"input": -1, "output": n_layer}.get(info.stage, info.layer or 0)

    sizes = {path: _size(leaf.shape) for path, leaf in zip(optim.param_paths(params), jax.tree.leaves(params))}
    trains = dict(zip(sizes, jax.tree.leaves(trainable)))
    embedding = [p for p, info in infos.items() if info.role == "embedding"]
    counted = {p: n for p, n in sizes.items() if not (p in infos and infos[p].role == "position")
               and not (classify and p in embedding)}
    lowest = min(layer(p) for p, t in trains.items() if t)
    head = {p: n for p, n in counted.items() if layer(p) == n_layer}
    if not classify:  # a tied head is the token embedding
        head.update({p: sizes[p] for p, info in infos.items() if info.is_head and info.role == "embedding"})
    attention = 4 * seq_len * n_embd  # per layer, forward
    forward = 2 * sum(counted.values()) + n_layer * attention
    passed = [p for p in counted if 0 <= layer(p) < n_layer and layer(p) >= lowest]
    backward = 2 * sum(counted[p] for p in passed) + 2 * attention * (n_layer - max(lowest, 0))
    if lowest < n_layer:
        backward += 2 * sum(head.values())
    weights = 2 * sum(n for p, n in counted.items() if trains[p])
    return float(forward + backward + weights)


# -- the table printed at start-up and written to WORKDIR/trainable.json ----------------------


@dataclasses.dataclass
class Summary:
    strategy: str
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int
    full_optimizer_state_bytes: int  # what full fine-tuning's AdamW state would take
    trainable: list  # paths
    weight_decay: list  # paths that decay (always trainable ones)
    table: str

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "trainable_params": self.trainable_params,
                "frozen_params": self.frozen_params, "total_params": self.total_params,
                "trainable_percent": self.trainable_percent, "optimizer_state_bytes": self.optimizer_state_bytes,
                "full_optimizer_state_bytes": self.full_optimizer_state_bytes,
                "trainable": self.trainable, "weight_decay": self.weight_decay}



def summarize(strategy: str, params, trainable, decay, opt_state, full_opt_state) -> Summary:
    """Counts (position embeddings included) and a per-parameter table; works on abstract trees."""
    paths = optim.param_paths(params)
    leaves, trains = jax.tree.leaves(params), jax.tree.leaves(trainable)
    decays = [bool(d and t) for d, t in zip(jax.tree.leaves(decay), trains)]
    rows = {}
    for path, leaf, t, d in zip(paths, leaves, trains, decays):
        name, layer = model_lib.split_layer(path)
        row = rows.setdefault((name, tuple(leaf.shape), t, d), [])
        if layer is not None:
            row.append(layer)
    names = {key: (model_lib.layer_path(_ranges(layers), key[0]) if layers else key[0]) for key, layers in rows.items()}
    width = max(len(n) for n in names.values())
    lines = [f"  {'parameter'.ljust(width)}  {'shape':>14}  {'size':>10}  trains  weight decay"]
    for key, layers in rows.items():
        name, shape, t, d = key
        size = max(len(layers), 1) * _size(shape)
        lines.append(f"  {names[key].ljust(width)}  {str(shape):>14}  {size:10,d}  {'yes' if t else 'no':6}  "
                     f"{'yes' if d else 'no'}")
    total = sum(_size(x.shape) for x in leaves)
    trainable_params = sum(_size(x.shape) for x, t in zip(leaves, trains) if t)
    summary = Summary(strategy, trainable_params, total, optim.state_bytes(opt_state),
                      optim.state_bytes(full_opt_state), [p for p, t in zip(paths, trains) if t],
                      [p for p, d in zip(paths, decays) if d], "")
    lines.append(f"  trainable {trainable_params:,d} of {total:,d} parameters ({summary.trainable_percent:.2f}%), "
                 f"frozen {summary.frozen_params:,d}; optimizer state {summary.optimizer_state_bytes:,d} bytes "
                 f"(full fine-tuning: {summary.full_optimizer_state_bytes:,d})")
    summary.table = "\n".join(lines)
    return summary


def collapse_paths(paths) -> list:
    """Paths with their layer indices gathered: blocks_{0-3}/attn/qkv/kernel, in first-seen order."""
    layers = {}
    for path in paths:
        name, layer = model_lib.split_layer(path)
        layers.setdefault(name, []).append(layer)
    return [model_lib.layer_path(_ranges(ids), name) if ids[0] is not None else name for name, ids in layers.items()]


def _size(shape) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _ranges(layers) -> str:
    """[0, 1, 2, 5] -> '{0-2,5}'; a single layer -> '3'."""
    layers = sorted(set(layers))
    if len(layers) == 1:
        return str(layers[0])
    runs = [[layers[0], layers[0]]]
    for layer in layers[1:]:
        if layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return "{" + ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) + "}"
