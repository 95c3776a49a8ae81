"""GPT-2 and Llama-style decoders in Flax linen, used purely functionally: `GPT(cfg).apply(params, tokens)`.

Reads top to bottom like the papers: config, attention, MLP, block, GPT, then what the
rest of gptlab asks the model about its parameters (`describe`: roles, blocks, counts,
FLOPs), so that fine-tuning strategies, weight decay tables, sharding logs, restore
plans and converters never parse parameter names themselves. Paths are stable and
readable (`blocks_3/attn/qkv/kernel`) because user-facing rules select by path.

GPT-2 is the default; Llama-style models are configuration: `position="rope"`,
`norm="rmsnorm"`, `mlp="swiglu"`, `n_kv_head < n_head` (grouped-query attention),
`bias=False`, `tie_embeddings=False`. LoRA lives outside (`gptlab.lora` transforms the
parameter tree), and so does the choice of a custom dense-layer gradient (`dot_general`,
set by whoever builds the training model).
"""
import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptlab import blocked_attention
from gptlab.optim import param_paths

# Activation-rematerialisation policies selectable by name from the config.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn", "explicit", "blocked")  # blocked: gptlab/blocked_attention.py
DTYPES = ("float32", "bfloat16", "float16")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # the model's context: longest sequence it accepts
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # key/value heads; 0: n_head (multi-head), fewer: grouped-query attention
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    qkv_bias: bool = False  # biases on the query/key/value projection even when bias=False (Qwen2)
    tie_embeddings: bool = True  # LM head reuses the token embedding matrix
    position: str = "learned"  # see POSITIONS: learned absolute embeddings (GPT-2) or rotary (Llama)
    rope_theta: float = 10000.0  # position=rope: base of the rotary frequencies
    norm: str = "layernorm"  # see NORMS
    norm_eps: float = 1e-5  # epsilon of every norm
    mlp: str = "gelu"  # see MLPS: GPT-2's tanh-GELU MLP or Llama's SwiGLU
    mlp_hidden: int = 0  # MLP width; 0: 4 * n_embd (gelu) or 8/3 * n_embd rounded up to 64 (swiglu)
    scan_layers: bool = False  # one nn.scan over stacked blocks (compiles once, whatever the depth)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of parameters
    attention: str = "xla"  # see ATTENTION_IMPLS
    remat: str = "none"  # see REMAT_POLICIES

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_embd a multiple of n_head")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                             "(0: as many as n_head)")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position=rope needs an even head size, got n_embd/n_head={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        choices = {"dtype": DTYPES, "param_dtype": DTYPES, "attention": ATTENTION_IMPLS,
                   "remat": tuple(REMAT_POLICIES), "position": POSITIONS, "norm": NORMS, "mlp": MLPS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.mlp_hidden < 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("model.mlp_hidden must be >= 0, model.rope_theta and model.norm_eps positive")

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

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)  # Llama's sizing


def _init(std: float):
    return nn.initializers.normal(stddev=std)


def _dense(cfg: GPTConfig, dot_general, features: int, std: float, name: str, bias: Optional[bool] = None):
    return nn.Dense(features, use_bias=cfg.bias if bias is None else bias, kernel_init=_init(std), dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name, dot_general=dot_general or jax.lax.dot_general)


def _norm(cfg: GPTConfig, name: str):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        name=name)


def rope(x, positions, theta: float):
    """Rotary position embedding (Su et al., 2021) in Llama's half-split layout.

    x (batch, seq, heads, head_dim), positions int (batch, seq): the first and second
    halves of each head are the two coordinates of head_dim/2 rotating pairs.
    """
    half = x.shape[-1] // 2
    frequencies = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * frequencies  # (batch, seq, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1).astype(x.dtype)


def attend(q, k, v, visible, dropout=lambda p: p):
    """Softmax attention written out: q (b, t, heads, d), k/v (b, s, kv_heads, d), visible bool (b|1, t, s).

    Heads share key/value heads in groups (head h uses kv head h // (heads / kv_heads)).
    Scores and softmax are float32 for stability.
    """
    b, t, heads, d = q.shape
    q = q.reshape(b, t, k.shape[2], heads // k.shape[2], d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(d)
    scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads, d)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    dot_general: Any = None

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, cache_index=None):
        """With `cache_index` (sampling), attends over the `cache` collection and writes this call's keys in."""
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        heads, kv_heads = cfg.n_head, cfg.kv_heads
        qkv = _dense(cfg, self.dot_general, (heads + 2 * kv_heads) * cfg.head_dim, 0.02, "qkv",
                     bias=cfg.bias or cfg.qkv_bias)(x)
        q, k, v = jnp.split(qkv.reshape(batch, seq_len, heads + 2 * kv_heads, cfg.head_dim),
                            [heads, heads + kv_heads], axis=2)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        dropout = lambda probs: nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
        if cache_index is not None:
            # The cache is (batch, kv_heads, slots, head_dim): the layout attention's matmuls read, so
            # no decode step transposes the whole cache (on a CPU those copies were about 30% of the kernel time).
            # A variable's initialiser runs only in `init_cache`: the capacity is that call's length.
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            keys = self.variable("cache", "keys", jnp.zeros, k.shape, k.dtype)
            values = self.variable("cache", "values", jnp.zeros, v.shape, v.dtype)
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, i, 0)))
            keys.value, values.value = write(keys.value, k, cache_index), write(values.value, v, cache_index)
            # A query sees the slots up to its own, so stale slots beyond it are ignored.
            visible = jnp.arange(keys.value.shape[2]) <= positions[:, :, None]
            y = attend(q, jnp.swapaxes(keys.value, 1, 2), jnp.swapaxes(values.value, 1, 2), visible)
        elif cfg.attention == "explicit" or (cfg.dropout > 0 and not deterministic):
            # jax.nn.dot_product_attention and the blocked form have no dropout: nanoGPT's attention dropout
            # needs the explicit form.
            y = attend(q, k, v, jnp.tril(jnp.ones((1, seq_len, seq_len), bool)), dropout)
        elif cfg.attention == "blocked":
            y = blocked_attention.causal_attention(q, k, v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
        y = y.reshape(batch, seq_len, cfg.n_embd)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) at init.
        y = _dense(cfg, self.dot_general, cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), "proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class MLP(nn.Module):
    cfg: GPTConfig
    dot_general: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        dense = lambda features, std, name: _dense(cfg, self.dot_general, features, std, name)
        if cfg.mlp == "swiglu":  # Llama: down(silu(gate(x)) * up(x))
            x = nn.silu(dense(cfg.hidden, 0.02, "gate")(x)) * dense(cfg.hidden, 0.02, "fc")(x)
        else:
            x = nn.gelu(dense(cfg.hidden, 0.02, "fc")(x), approximate=True)  # GPT-2 uses the tanh approximation
        x = dense(cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), "proj")(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig
    dot_general: Any = None

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, cache_index=None):
        cfg = self.cfg
        x = x + CausalSelfAttention(cfg, self.dot_general, name="attn")(
            _norm(cfg, "ln_1")(x), positions, deterministic, cache_index)
        return x + MLP(cfg, self.dot_general, name="mlp")(_norm(cfg, "ln_2")(x), deterministic)


class GPT(nn.Module):
    cfg: GPTConfig
    dot_general: Any = None  # how every dense layer multiplies (None: jax.lax.dot_general); see experiment.training_model

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, return_hidden: bool = False, cache_index=None):
        """tokens: int (batch, seq_len) -> logits (batch, seq_len, vocab_size).

        With `return_hidden=True`, returns the final-norm hidden states
        (batch, seq_len, n_embd) instead, for task heads built on the body.
        Sampling passes `cache_index` (batch,), the cache slot and position of each
        row's first token, with the `cache` collection (`init_cache`) mutable.
        """
        cfg = self.cfg
        seq_len = tokens.shape[-1]
        if seq_len > cfg.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds the model's context "
                             f"model.block_size={cfg.block_size}")
        embed = lambda num, name: nn.Embed(num, cfg.n_embd, embedding_init=_init(0.02),
                                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        wte = embed(cfg.vocab_size, "wte")
        offset = jnp.zeros((tokens.shape[0], 1), jnp.int32) if cache_index is None else cache_index[:, None]
        positions = offset + jnp.arange(seq_len)
        x = wte(tokens)
        if cfg.position == "learned":
            x = x + embed(cfg.block_size, "wpe")(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        block = Block
        if cfg.remat != "none" and cache_index is None:  # sampling differentiates nothing
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))
        if cfg.scan_layers:
            scan = nn.scan(lambda module, x, _: (module(x, positions, deterministic, cache_index), None),
                           variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                           length=cfg.n_layer)
            x, _ = scan(block(cfg, self.dot_general, name="blocks"), x, None)
        else:
            for i in range(cfg.n_layer):
                x = block(cfg, self.dot_general, name=f"blocks_{i}")(x, positions, deterministic, cache_index)
        x = _norm(cfg, "ln_f")(x)
        if return_hidden:
            return x
        if cfg.tie_embeddings:
            return wte.attend(x)
        return _dense(cfg, None, cfg.vocab_size, 0.02, "lm_head", bias=False)(x)


def init_params(cfg: GPTConfig, key: jax.Array) -> Any:
    """Initialises parameters for `cfg` from a `jax.random.key`."""
    tokens = jnp.zeros((1, min(cfg.block_size, 8)), dtype=jnp.int32)
    return GPT(cfg).init({"params": key}, tokens)["params"]


def init_cache(cfg: GPTConfig, batch_size: int, capacity: int = 0) -> dict:
    """An empty key/value cache (the `cache` collection) for `capacity` tokens (0: block_size) per row."""
    tokens = jnp.zeros((batch_size, capacity or cfg.block_size), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), tokens,
                                                  cache_index=jnp.zeros((batch_size,), jnp.int32))["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_batch_axis(cfg: GPTConfig) -> int:
    """The batch axis of every `cache` array (stacked, scanned blocks put the layer axis first)."""
    return 1 if cfg.scan_layers else 0


# --- what the model says about its parameters ---------------------------------------------

ROLES = ("embedding", "position", "attention", "mlp", "norm", "head")
_BLOCK = re.compile(r"blocks(?:_(\d+))?/(.*)")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What one parameter is, for the code that treats kinds of parameters differently."""
    role: str  # one of ROLES
    stage: str  # input (embeddings), block, or output (final norm and head): the order of computation
    layer: Optional[int]  # the block it belongs to; None outside the blocks and for stacked (scanned) blocks
    leaf: str  # kernel, bias, scale or embedding
    is_head: bool  # computes the logits (the token embedding does too when the head is tied to it)


def split_layer(path: str) -> tuple:
    """'blocks_3/attn/qkv/kernel' -> ('attn/qkv/kernel', 3); outside the blocks -> (path, None)."""
    match = _BLOCK.fullmatch(path)
    return (match.group(2), int(match.group(1)) if match.group(1) else None) if match else (path, None)


def layer_path(layers: str, name: str) -> str:
    """The inverse of `split_layer` for display: layer_path('{0-3}', 'attn/qkv/kernel')."""
    return f"blocks_{layers}/{name}"


def any_layer(path: str) -> str:
    """'blocks_3/attn/qkv/kernel' -> 'blocks_*/attn/qkv/kernel': one name for a parameter of every block."""
    name, layer = split_layer(path)
    return layer_path("*", name) if layer is not None else path


def describe(params) -> dict:
    """{path: ParamInfo} for the model's own parameters; others (LoRA adapters, task heads) are absent."""
    return describe_paths(param_paths(params))


def describe_paths(paths) -> dict:
    """`describe` for `/`-joined parameter paths (of a checkpoint, say) rather than a tree."""
    paths = list(paths)
    tied = not any(p.startswith("lm_head/") for p in paths)
    infos = {}
    for path in paths:
        name, layer = split_layer(path)
        top, leaf = name.split("/")[0], name.rsplit("/", 1)[-1]
        if leaf not in ("kernel", "bias", "scale", "embedding"):
            continue
        in_block = name != path
        if in_block and top in ("attn", "mlp"):
            info = ParamInfo("attention" if top == "attn" else "mlp", "block", layer, leaf, False)
        elif in_block and top in ("ln_1", "ln_2"):
            info = ParamInfo("norm", "block", layer, leaf, False)
        elif path == "wte/embedding":
            info = ParamInfo("embedding", "input", None, leaf, tied)
        elif path == "wpe/embedding":
            info = ParamInfo("position", "input", None, leaf, False)
        elif top == "ln_f":
            info = ParamInfo("norm", "output", None, leaf, False)
        elif top == "lm_head":
            info = ParamInfo("head", "output", None, leaf, True)
        else:
            continue
        infos[path] = info
    return infos


def count_params(params, exclude_position_embeddings: bool = True, non_embedding: bool = False) -> int:
    """Parameter count; like nanoGPT, position embeddings are left out by default.

    `non_embedding`: also leave out the token embedding (Kaplan et al.'s N; a tied head with it).
    """
    infos = describe(params)
    left_out = {"position"} if exclude_position_embeddings or non_embedding else set()
    if non_embedding:
        left_out.add("embedding")
    total = 0
    for path, leaf in zip(param_paths(params), jax.tree.leaves(params)):
        info = infos.get(path)
        if info is None or info.role not in left_out:
            total += leaf.size
    return int(total)


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward plus attention.

    N excludes position embeddings (as nanoGPT and the PaLM appendix count it);
    the attention term is 6 * n_layer * seq_len * n_embd * 2 (QK^T and AV over every query head).
    """
    return 6.0 * num_params + 12.0 * cfg.n_layer * cfg.n_embd * seq_len
