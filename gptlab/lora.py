"""LoRA (Hu et al., 2021) as a transformation of the parameter tree, outside the model.

`add` puts a pair of adapters beside every kernel a target regex matches
(`blocks_0/attn/qkv/{kernel, lora_a, lora_b}`): A (in, rank) drawn normal, B (rank, out)
zeros. `merge` folds them back, W + (alpha / rank) A B, and drops them. The adapted
model is the plain model applied to the merged tree (`Adapted`), so the model file
knows nothing of LoRA: with B = 0 the merged kernel is W itself and the adapted model
starts exactly equal to its base; fine-tuning trains A and B (gradients flow through
the merge) while W stays frozen; and the export for other tools is the same `merge`,
so it computes exactly what the adapted model computed.
"""
import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from gptlab import optim
from gptlab.errors import UserError

ADAPTERS = ("lora_a", "lora_b")


def is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTERS


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in optim.param_paths(params))


def check_targets(params, targets: Sequence[str]) -> None:
    """LoRA adapts dense layers: every target must match, and match only kernels."""
    if not targets:
        raise UserError("finetune.lora_targets is empty: give regexes over kernel paths, "
                        r"e.g. ('blocks_\d+/attn/(qkv|proj)/kernel',)")
    mask = optim.match_mask(params, targets, "finetune.lora_targets")
    for path, hit in zip(optim.param_paths(params), jax.tree.leaves(mask)):
        if hit and not path.endswith("/kernel"):
            raise UserError(f"finetune.lora_targets matches {path}, which is not the kernel of a dense layer: "
                            "LoRA adapts kernels (paths ending in /kernel)")


def add(params, settings: "LoRA", key: jax.Array):
    """`params` with adapters beside every kernel matching `settings.targets`."""
    targets, rank = settings.targets, settings.rank
    check_targets(params, targets)
    compiled = [re.compile(t) for t in targets]
    count = [0]

    def walk(tree, prefix):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v, f"{prefix}{k}/") for k, v in tree.items()}
        kernel = tree.get("kernel")
        if kernel is not None and not isinstance(kernel, dict) and any(r.fullmatch(f"{prefix}kernel") for r in compiled):
            (fan_in, fan_out), dtype = kernel.shape[-2:], kernel.dtype
            count[0] += 1
            a_key = jax.random.fold_in(key, count[0])
            # Stacked (scanned) kernels get stacked adapters: leading axes carry over.
            out["lora_a"] = jax.random.normal(a_key, (*kernel.shape[:-2], fan_in, rank), dtype) / math.sqrt(fan_in)
            out["lora_b"] = jnp.zeros((*kernel.shape[:-2], rank, fan_out), dtype)
        return out

    return walk(params, "")


def merge(params, scale: float):
    """Every adapter folded into its kernel, W + scale * A B (float32, full precision); adapters dropped."""
    if not isinstance(params, dict):
        return params
    if "lora_a" not in params:
        return {k: merge(v, scale) for k, v in params.items()}
    kernel = params["kernel"]
    delta = jnp.matmul(jnp.asarray(params["lora_a"], jnp.float32), jnp.asarray(params["lora_b"], jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    merged = {k: v for k, v in params.items() if k not in ADAPTERS}
    merged["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return merged


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Which kernels get adapters, and how large: finetune.lora_rank, lora_alpha, lora_targets."""
    rank: int
    alpha: float
    targets: tuple  # regexes (fullmatch) over kernel paths

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"finetune.lora_rank={self.rank}: LoRA needs a rank of at least 1 (typical: 4-16)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_run(cls, run_config: dict) -> "LoRA":
        """The settings a run's stored (JSON) config holds in its `finetune` group."""
        finetune = run_config.get("finetune") or {}
        try:
            return cls(int(finetune["lora_rank"]), float(finetune["lora_alpha"]), tuple(finetune["lora_targets"]))
        except (KeyError, TypeError, ValueError):
            raise UserError("the checkpoint holds LoRA adapters but its config has no finetune.lora_rank/"
                            "lora_alpha/lora_targets: it was not written by a gptlab LoRA fine-tuning run") from None


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A model whose parameters carry adapters: `apply` merges them, then applies the plain model."""
    model: Any  # a flax module (gptlab.model.GPT)
    scale: float  # lora_alpha / lora_rank

    def apply(self, variables, *args, **kwargs):
        return self.model.apply({**variables, "params": merge(variables["params"], self.scale)}, *args, **kwargs)
