"""GPT-2 in Flax linen, used purely functionally: `GPT(cfg).apply(params, tokens)`.

Reads top to bottom like the paper: config, attention, MLP, block, GPT. Parameter
paths are stable and readable (`blocks_3/attn/qkv/kernel`) because fine-tuning
masks, weight-decay rules and checkpoint checks select parameters by path.
"""
import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Activation-rematerialisation policies selectable by name from the config.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn", "explicit")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # the model's context: longest sequence it accepts
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    tie_embeddings: bool = True  # LM head reuses the token embedding matrix
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of parameters
    attention: str = "xla"  # see ATTENTION_IMPLS
    remat: str = "none"  # see REMAT_POLICIES
    dense_backward: str = "xla"  # see DENSE_DOTS
    lora_rank: int = 0  # LoRA adapters of this rank on the kernels matching lora_targets; 0: none
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / lora_rank
    lora_targets: tuple = (r"blocks_\d+/attn/(qkv|proj)/kernel",)  # regexes (fullmatch) over kernel paths

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_embd a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ValueError(f"model.dtype/param_dtype must be one of {DTYPES}, "
                             f"got {self.dtype!r}/{self.param_dtype!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        if self.dense_backward not in DENSE_DOTS:
            raise ValueError(f"model.dense_backward={self.dense_backward!r} is not one of {tuple(DENSE_DOTS)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0: no adapters)")

    @classmethod
    def from_config(cls, model_config, **overrides) -> "GPTConfig":
        """Builds the model config from the `model` group of an experiment config."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # None ("as stored") for a field an older run did not store means its default.
        has_default = lambda name: fields[name].default is not dataclasses.MISSING
        values = {k: v for k, v in dict(model_config).items() if k in fields and not (v is None and has_default(k))}
        values.update(overrides)
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _init(std: float):
    return nn.initializers.normal(stddev=std)


@jax.custom_vjp
def _matmul_narrow_transpose(x, kernel):
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals, grad):
    x, kernel = residuals
    rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    # The kernel gradient contracts over the rows of both. XLA's CPU dot would rewrite the
    # (wide) output gradient transposed, inside its elementwise producer (GELU's backward),
    # which is the slowest part of the CPU backward pass; transposing the narrower operand
    # explicitly, behind a barrier so XLA cannot fold it back into the dot, is cheaper.
    if rows_x.shape[1] <= rows_grad.shape[1]:
        kernel_grad = jnp.dot(jax.lax.optimization_barrier(rows_x.T), rows_grad)
    else:  # the gradient is the narrower one: transpose it, and the small result back
        kernel_grad = jnp.dot(jax.lax.optimization_barrier(rows_grad.T), rows_x).T
    return jnp.dot(grad, kernel.T), kernel_grad.astype(kernel.dtype)


_matmul_narrow_transpose.defvjp(_matmul_fwd, _matmul_bwd)


def dot_narrow_transpose(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for nn.Dense (x @ kernel) whose backward pass uses `_matmul_bwd`."""
    del dimension_numbers, precision, preferred_element_type  # nn.Dense's: contract x's last axis with kernel's first
    return _matmul_narrow_transpose(lhs, rhs)


# model.dense_backward: how dense layers compute their kernel gradient. "xla": as XLA
# decides; "narrow_transpose": see _matmul_bwd (faster on CPUs, measured by experiments.benchmark).
DENSE_DOTS = {"xla": None, "narrow_transpose": dot_narrow_transpose}


class Dense(nn.Dense):
    """nn.Dense plus, when its kernel's path matches `cfg.lora_targets`, a LoRA adapter.

    LoRA (Hu et al., 2021): y = x W + b + (alpha / rank) x A B, with A (in, rank)
    drawn normal and B (rank, out) zeros, so an adapted model starts exactly equal
    to its base model; fine-tuning trains A and B while W stays frozen.
    """
    cfg: Any = None  # the GPTConfig with the LoRA settings; None: a plain Dense

    @nn.compact
    def __call__(self, x):
        y = super().__call__(x)
        cfg = self.cfg
        kernel_path = "/".join(self.path) + "/kernel"
        if cfg is None or not cfg.lora_rank or not any(re.fullmatch(t, kernel_path) for t in cfg.lora_targets):
            return y
        a = self.param("lora_a", _init(1.0 / math.sqrt(x.shape[-1])), (x.shape[-1], cfg.lora_rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (cfg.lora_rank, self.features), self.param_dtype)
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
        return y + (x @ a) @ b * (cfg.lora_alpha / cfg.lora_rank)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool, cache=None, cache_index=None):
        """With a `cache` (sampling), also returns it with this call's keys and values written in."""
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        dense = lambda features, std, name: Dense(
            features, use_bias=cfg.bias, kernel_init=_init(std), dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, name=name, cfg=cfg, dot_general=DENSE_DOTS[cfg.dense_backward])
        qkv = dense(3 * cfg.n_embd, 0.02, "qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, seq_len, 3 * cfg.n_head, cfg.head_dim), 3, axis=2)
        attn_dropout = cfg.dropout > 0 and not deterministic
        if cache is not None:
            y, cache = cached_attention(q, k, v, cache, cache_index)
        elif cfg.attention == "explicit" or attn_dropout:
            # jax.nn.dot_product_attention has no dropout, so nanoGPT's attention
            # dropout needs the explicit form (softmax in float32 for stability).
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
            causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
            scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
            probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
            y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
        y = y.reshape(batch, seq_len, cfg.n_embd)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) at init.
        y = dense(cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), "proj")(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y if cache is None else (y, cache)


def cached_attention(q, k, v, cache, cache_index):
    """Causal attention of new tokens over a key/value cache, for sampling.

    cache: (keys, values), each (batch, capacity, n_head, head_dim); cache_index: int
    (batch,), the slot of each row's first new token. The new keys and values are
    written there; a query sees the slots up to its own, so stale slots beyond are ignored.
    """
    write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (i, 0, 0)))
    k_all, v_all = write(cache[0], k, cache_index), write(cache[1], v, cache_index)
    query_slots = cache_index[:, None] + jnp.arange(q.shape[1])  # (batch, new tokens)
    visible = jnp.arange(k_all.shape[1]) <= query_slots[:, :, None]  # (batch, new tokens, capacity)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_all) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_all), (k_all, v_all)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        common = dict(use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, cfg=cfg,
                      dot_general=DENSE_DOTS[cfg.dense_backward])
        x = Dense(4 * cfg.n_embd, kernel_init=_init(0.02), name="fc", **common)(x)
        x = nn.gelu(x, approximate=True)  # GPT-2 uses the tanh approximation
        x = Dense(cfg.n_embd, kernel_init=_init(0.02 / math.sqrt(2 * cfg.n_layer)),
                     name="proj", **common)(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool, cache=None, cache_index=None):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_bias=self.cfg.bias, dtype=self.cfg.dtype,
                                         param_dtype=self.cfg.param_dtype, name=name)
        attn = CausalSelfAttention(self.cfg, name="attn")
        if cache is None:
            x = x + attn(norm("ln_1")(x), deterministic)
        else:
            y, cache = attn(norm("ln_1")(x), deterministic, cache, cache_index)
            x = x + y
        x = x + MLP(self.cfg, name="mlp")(norm("ln_2")(x), deterministic)
        return x if cache is None else (x, cache)


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, return_hidden: bool = False,
                 cache=None, cache_index=None):
        """tokens: int (batch, seq_len) -> logits (batch, seq_len, vocab_size).

        With `return_hidden=True`, returns the final-LayerNorm hidden states
        (batch, seq_len, n_embd) instead, for task heads built on the body.
        Sampling passes a key/value `cache` (`init_cache`) and `cache_index` (batch,),
        the cache slot and position of each row's first token; the call then
        returns (logits, cache) with this call's keys and values written in.
        """
        cfg = self.cfg
        seq_len = tokens.shape[-1]
        if seq_len > cfg.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds the model's context "
                             f"model.block_size={cfg.block_size}")
        embed = lambda num, name: nn.Embed(num, cfg.n_embd, embedding_init=_init(0.02),
                                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        wte = embed(cfg.vocab_size, "wte")
        positions = jnp.arange(seq_len) if cache is None else cache_index[:, None] + jnp.arange(seq_len)
        x = wte(tokens) + embed(cfg.block_size, "wpe")(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(2,))
        new_cache = []
        for i in range(cfg.n_layer):
            if cache is None:
                x = block(cfg, name=f"blocks_{i}")(x, deterministic)
            else:  # sampling differentiates nothing, so there is nothing to rematerialise
                x, layer_cache = Block(cfg, name=f"blocks_{i}")(x, deterministic, cache[i], cache_index)
                new_cache.append(layer_cache)
        x = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="ln_f")(x)
        if return_hidden:
            out = x
        elif cfg.tie_embeddings:
            out = wte.attend(x)
        else:
            out = Dense(cfg.vocab_size, use_bias=False, kernel_init=_init(0.02), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name="lm_head", cfg=cfg)(x)
        return out if cache is None else (out, new_cache)


def init_params(cfg: GPTConfig, key: jax.Array) -> Any:
    """Initialises parameters for `cfg` from a `jax.random.key`."""
    tokens = jnp.zeros((1, min(cfg.block_size, 8)), dtype=jnp.int32)
    return GPT(cfg).init({"params": key}, tokens)["params"]


def init_cache(cfg: GPTConfig, batch_size: int, capacity: int = 0) -> list:
    """An empty key/value cache: per layer (keys, values), each (batch, capacity, n_head, head_dim)."""
    shape = (batch_size, capacity or cfg.block_size, cfg.n_head, cfg.head_dim)
    return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.n_layer)]


def count_params(params, exclude_position_embeddings: bool = True) -> int:
    """Parameter count; like nanoGPT, position embeddings are left out by default."""
    total = sum(x.size for x in jax.tree.leaves(params))
    if exclude_position_embeddings and "wpe" in params:
        total -= params["wpe"]["embedding"].size
    return int(total)


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward plus attention.

    N excludes position embeddings (as nanoGPT and the PaLM appendix count it);
    the attention term is 6 * n_layer * seq_len * n_embd * 2 (QK^T and AV).
    """
    return 6.0 * num_params + 12.0 * cfg.n_layer * cfg.n_embd * seq_len
