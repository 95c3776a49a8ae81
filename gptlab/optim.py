"""Optimizer, learning-rate schedule, and rules over parameter paths.

Rules are data: regexes matched with `re.fullmatch` against `/`-joined
parameter paths (`blocks_3/attn/qkv/kernel`). A rule that matches no parameter
is an error naming the rule, so a typo never silently changes what trains or
decays.
"""
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from gptlab.errors import UserError


def path_str(path) -> str:
    """`/`-joined names of a key path from `jax.tree_util.tree_map_with_path`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_paths(params) -> list:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def match_mask(params, patterns: Sequence[str], what: str):
    """A bool tree with `params`' structure: True where a path fullmatches a pattern.

    `what` names the config field the patterns came from, for the error message.
    """
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise UserError(f"{what}: {pattern!r} is not a valid regex ({e})") from None
    paths = param_paths(params)
    for pattern, regex in zip(patterns, compiled):
        if not any(regex.fullmatch(p) for p in paths):
            raise UserError(f"{what}: regex {pattern!r} matches no parameter; parameter paths look like "
                            f"{paths[len(paths) // 2]!r} (see the parameter table printed at start-up)")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(r.fullmatch(path_str(path)) for r in compiled), params)


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to the floor at `decay_steps`.

    A warmup longer than the decay (a short smoke run) simply never reaches the peak.
    """
    peak, floor = opt_cfg.learning_rate, opt_cfg.min_learning_rate
    warmup, decay_steps = opt_cfg.warmup_steps, opt_cfg.decay_steps or max(num_steps, 1)
    if peak <= 0 or floor < 0 or floor > peak:
        raise UserError(f"optimizer.learning_rate={peak} and min_learning_rate={floor} must satisfy "
                        "0 <= min_learning_rate <= learning_rate and learning_rate > 0")
    if warmup < 0 or decay_steps < 1:
        raise UserError(f"optimizer.warmup_steps={warmup} must be >= 0 and decay_steps={decay_steps} >= 1")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def adamw(opt_cfg, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW, decaying only parameters in `weight_decay_on`."""
    if opt_cfg.weight_decay < 0:
        raise UserError(f"optimizer.weight_decay={opt_cfg.weight_decay} must be non-negative")
    decay_mask = match_mask(params, opt_cfg.weight_decay_on, "optimizer.weight_decay_on")
    chain = []
    if opt_cfg.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state (moments and counters)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")))

