"""`model.attention="blocked"`: causal attention in blocks of queries, with a hand-written backward.

The CPU's attention (`perf.choose_attention`). The same numbers as `model.attend`
(to float32 rounding), computed so that XLA's CPU backend does less:
- Queries are taken `QUERY_BLOCK` at a time, and block i attends only to the keys up
  to its own last position: the fully masked upper-right blocks of the score matrix are
  never computed (at context 256, 5/8 of the full matrix is computed with blocks of 64).
- Heads come first (heads, batch, seq, head_dim), so every attention matmul is a plain
  batched matmul and no score-sized array is transposed.
- The backward pass is written out (`_backward`): it reuses the forward's probabilities,
  takes the softmax gradient's row sums from the (seq, head_dim) outputs rather than the
  (seq, seq) probabilities, and adds each block's key and value gradients in place.

No attention dropout: the model uses `attend` when dropout is on in training, and for
sampling with the key/value cache.
"""
import functools
import math

import jax
import jax.numpy as jnp

# Queries per block. Timed as whole train steps on a 2-core Intel Xeon (2026-11-30): at the baby
# GPT's context 256, blocks of 64 were 2% faster than 128 and 5% faster than one block; at the
# `small` preset's 128, 64 was 8% faster than 128 and 12% faster than 32.
QUERY_BLOCK = 64


def causal_attention(q, k, v, query_block: int = QUERY_BLOCK):
    """Causal softmax attention: q (batch, seq, heads, d), k/v (batch, seq, kv_heads, d) -> like q.

    Key/value heads are shared by groups of query heads (grouped-query attention) as in
    `model.attend`. Scores and softmax are float32.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:  # each kv head serves heads // kv_heads query heads; autodiff sums their gradients
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    heads_first = lambda x: x.transpose(2, 0, 1, 3)
    out = _attention(heads_first(q), heads_first(k), heads_first(v), query_block)
    return out.transpose(1, 2, 0, 3)


def _blocks(seq_len: int, query_block: int) -> list:
    return [(start, min(start + query_block, seq_len)) for start in range(0, seq_len, query_block)]


def _mask_bias(start: int, end: int):
    """0 where query start+i may see key j (j <= start+i), -inf above the diagonal: (end-start, end)."""
    visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    return jnp.where(visible, 0.0, -jnp.inf).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, query_block):
    return _forward(q, k, v, query_block)[0]


def _forward(q, k, v, query_block):
    """q/k/v (heads, batch, seq, d) -> out (heads, batch, seq, d), and what the backward reuses."""
    seq_len, d = q.shape[2], q.shape[3]
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    outs, probs = [], []
    for start, end in _blocks(seq_len, query_block):
        scores = jnp.einsum("hbtd,hbsd->hbts", q[:, :, start:end], k[:, :, :end],
                            preferred_element_type=jnp.float32) + _mask_bias(start, end)
        p = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        outs.append(jnp.einsum("hbts,hbsd->hbtd", p, v[:, :, :end]))
        probs.append(p)
    out = jnp.concatenate(outs, axis=2)
    return out, (q, k, v, probs, out)


def _backward(query_block, residuals, grad):
    q, k, v, probs, out = residuals  # q is already scaled by 1/sqrt(d)
    d = q.shape[3]
    # The softmax gradient's row sums, sum_s p_ts dP_ts = sum_d grad_td out_td, from (seq, d) arrays.
    row_sums = jnp.einsum("hbtd,hbtd->hbt", grad.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    dq, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for (start, end), p in zip(_blocks(q.shape[2], query_block), probs):
        g = grad[:, :, start:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("hbts,hbtd->hbsd", p, g))
        dp = jnp.einsum("hbtd,hbsd->hbts", g, v[:, :, :end], preferred_element_type=jnp.float32)
        ds = (p.astype(jnp.float32) * (dp - row_sums[:, :, start:end])).astype(q.dtype)
        dq.append(jnp.einsum("hbts,hbsd->hbtd", ds, k[:, :, :end]))
        dk = dk.at[:, :, :end].add(jnp.einsum("hbts,hbtd->hbsd", ds, q[:, :, start:end]))
    dq = jnp.concatenate(dq, axis=2) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    return dq, dk, dv


_attention.defvjp(_forward, _backward)
