"""What fine-tuning trains: strategies as masks over parameter paths, and an optimizer
that leaves every frozen parameter exactly where it was.

Each strategy is a tuple of regexes (`re.fullmatch` on `/`-joined parameter paths,
as everywhere in gptlab) turned into a bool tree with the params' structure by
`gptlab.optim.match_mask`, so a regex that matches nothing is an error naming it.

| strategy    | trains                                                         |
| ----------- | -------------------------------------------------------------- |
| `full`      | every parameter                                                |
| `head`      | the output head only (a linear probe)                          |
| `last_k`    | the last k blocks, the final LayerNorm and the head            |
| `bitfit`    | biases only (Ben Zaken et al., 2021)                           |
| `layernorm` | LayerNorm scales and biases only                               |
| `lora`      | the low-rank adapters `lora_a`/`lora_b` only (Hu et al., 2021)  |
| `regex`     | the parameters matching `finetune.trainable`                   |

"The head" is `lm_head` when the model has one, the token embedding `wte` when the
head is tied to it (training it then also moves the input embedding; fine-tuning
unties it by default, see configs/finetune.py), and `cls_head` for classification.
A freshly initialised `cls_head` always trains, whatever the strategy.
"""
import dataclasses
import json
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from gptlab import optim
from gptlab.errors import UserError

STRATEGIES = ("full", "head", "last_k", "bitfit", "layernorm", "lora", "regex")
LAYERNORM = r"(blocks_\d+/ln_[12]|ln_f)/(scale|bias)"
LORA = r".*/lora_[ab]"


def head_rules(params) -> tuple:
    """The output head: the classifier, the untied LM head, or the tied token embedding."""
    if "cls_head" in params:
        return (r"cls_head/.*",)
    if "lm_head" in params:
        return (r"lm_head/.*",)
    return (r"wte/embedding",)


def strategy_rules(strategy: str, params, n_layer: int, last_k: int = 2, trainable: Sequence[str] = ()) -> tuple:
    """The regexes of the parameters `strategy` trains, plus the extra `trainable` ones."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown finetune.strategy={strategy!r}: choose one of {STRATEGIES}")
    if strategy == "full":
        rules = (r".*",)
    elif strategy == "head":
        rules = head_rules(params)
    elif strategy == "last_k":
        if not 1 <= last_k <= n_layer:
            raise UserError(f"finetune.last_k={last_k} does not fit the model's {n_layer} layers: "
                            f"choose 1 <= last_k <= {n_layer}")
        blocks = "|".join(str(i) for i in range(n_layer - last_k, n_layer))
        rules = (rf"blocks_({blocks})/.*", r"ln_f/.*", *head_rules(params))
    elif strategy == "bitfit":
        if not any(p.endswith("/bias") for p in optim.param_paths(params)):
            raise UserError("finetune.strategy=bitfit trains biases, but this model has none (model.bias=False): "
                            "choose another strategy, e.g. layernorm or lora")
        rules = (r".*/bias",)
    elif strategy == "layernorm":
        rules = (LAYERNORM,)
    elif strategy == "lora":
        if not any(re.fullmatch(LORA, p) for p in optim.param_paths(params)):
            raise UserError("finetune.strategy=lora, but the model has no LoRA adapters: set finetune.lora_rank > 0 "
                            "and finetune.lora_targets to kernels of dense layers")
        rules = (LORA,)
    else:  # regex
        if not trainable:
            raise UserError("finetune.strategy=regex needs finetune.trainable, a tuple of regexes over parameter "
                            "paths, e.g. --config.finetune.trainable=\"('blocks_3/.*', 'ln_f/.*')\"")
        rules = ()  # only `trainable` (added below), plus a new classification head
    if "cls_head" in params:  # a new, randomly initialised head must learn, whatever else is frozen
        rules = (*rules, r"cls_head/.*")
    return tuple(dict.fromkeys((*rules, *trainable)))


def trainable_mask(params, strategy: str, n_layer: int, last_k: int = 2, trainable: Sequence[str] = ()):
    """A bool tree with `params`' structure: True where fine-tuning with `strategy` trains."""
    rules = strategy_rules(strategy, params, n_layer, last_k, trainable)
    what = "finetune.trainable" if strategy == "regex" else f"finetune.strategy={strategy} (+ finetune.trainable)"
    return optim.match_mask(params, rules, what)


def check_lora_targets(params, targets: Sequence[str]) -> None:
    """LoRA adapts dense layers: every target must match, and match only kernels."""
    if not targets:
        raise UserError("finetune.lora_targets is empty: give regexes over kernel paths, "
                        r"e.g. ('blocks_\d+/attn/(qkv|proj)/kernel',)")
    mask = optim.match_mask(params, targets, "finetune.lora_targets")
    for path, hit in zip(optim.param_paths(params), jax.tree.leaves(mask)):
        if hit and not path.endswith("/kernel"):
            raise UserError(f"finetune.lora_targets matches {path}, which is not the kernel of a dense layer: "
                            "LoRA adapts kernels (paths ending in /kernel)")


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


def merge_lora(params, cfg):
    """Folds every LoRA adapter into its kernel, W + (alpha / rank) A B, and drops the adapters.

    Returns (params, cfg) of the plain model (lora_rank=0), which computes what the
    adapted model computed, up to float rounding.
    """
    if not cfg.lora_rank:
        return params, cfg
    scale = cfg.lora_alpha / cfg.lora_rank

    def merge(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" not in tree:
            return {k: merge(v) for k, v in tree.items()}
        kernel = tree["kernel"]
        delta = jnp.matmul(jnp.asarray(tree["lora_a"], jnp.float32), jnp.asarray(tree["lora_b"], jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        merged = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
        merged["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
        return merged

    return merge(params), dataclasses.replace(cfg, lora_rank=0)


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
    """
    classify = "cls_head" in params

    def layer(path):  # -1: embeddings, 0..n_layer-1: blocks, n_layer: ln_f and the heads
        top = path.split("/")[0]
        if top in ("wte", "wpe"):
            return -1
        return int(top[len("blocks_"):]) if top.startswith("blocks_") else n_layer

    sizes = {path: _size(leaf.shape) for path, leaf in zip(optim.param_paths(params), jax.tree.leaves(params))}
    trains = dict(zip(sizes, jax.tree.leaves(trainable)))
    counted = {p: n for p, n in sizes.items() if p != "wpe/embedding" and not (classify and p == "wte/embedding")}
    lowest = min(layer(p) for p, t in trains.items() if t)
    head = {p: n for p, n in counted.items() if layer(p) == n_layer}
    if not classify and "lm_head/kernel" not in sizes:  # the tied head is the token embedding
        head["wte/embedding"] = sizes["wte/embedding"]
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

    def write(self, path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def summarize(strategy: str, params, trainable, decay, opt_state, full_opt_state) -> Summary:
    """Counts (position embeddings included) and a per-parameter table; works on abstract trees."""
    paths = optim.param_paths(params)
    leaves, trains = jax.tree.leaves(params), jax.tree.leaves(trainable)
    decays = [bool(d and t) for d, t in zip(jax.tree.leaves(decay), trains)]
    rows = {}
    for path, leaf, t, d in zip(paths, leaves, trains, decays):
        match = re.match(r"blocks_(\d+)/(.*)", path)
        name, layer = (match.group(2), int(match.group(1))) if match else (path, None)
        row = rows.setdefault((name, tuple(leaf.shape), t, d), [])
        if layer is not None:
            row.append(layer)
    names = {key: (f"blocks_{_ranges(layers)}/{key[0]}" if layers else key[0]) for key, layers in rows.items()}
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
        match = re.match(r"blocks_(\d+)/(.*)", path)
        name, layer = (match.group(2), int(match.group(1))) if match else (path, None)
        layers.setdefault(name, []).append(layer)
    return [f"blocks_{_ranges(ids)}/{name}" if ids[0] is not None else name for name, ids in layers.items()]


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
