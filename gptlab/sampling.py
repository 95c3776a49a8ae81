"""Autoregressive sampling with a key/value cache.

The prompts are prefilled in one forward pass; then each step samples one token per
row and runs it through the model at its cache slot, all inside one
`jax.lax.while_loop`, so a generation is one compiled program, compiled once per
(model, batch size, padded prompt length, max_new_tokens). Temperature, top-k,
top-p, the end token and the seed are traced values: changing them never recompiles.

Prompts of different lengths share a batch right-padded: every row has its own
length, cache slot and position, and a query sees only its own row's slots up to
its own, so padding is never attended to. The loop stops when every row has
produced the end token or `max_new_tokens` tokens.

Beyond the context: a prompt longer than `block_size` keeps its last `block_size`
tokens (with a warning). When a row's next token would not fit in the cache, the
cache is rebuilt in one forward pass from the row's last `block_size // 2` tokens
(learned absolute position embeddings rule out a rolling cache; rotary ones
are rebuilt the same way, so both compute what a full recompute computes), so every token is
predicted from at least half a context, and a rebuild is amortised over
`block_size // 2` cheap steps. Within the context, sampling with the cache computes
exactly what recomputing the full forward pass at every step computes.
"""
import functools
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptlab import model as model_lib
from gptlab.errors import UserError


def window_start(length: int, start: int, block_size: int) -> int:
    """Where the context that predicts token `length` begins, given the previous window's start.

    The window grows with the sequence until it would exceed `block_size`, then
    restarts at the last `block_size // 2` tokens. This is the rule the cache
    follows; a full recompute that follows it too gives the same tokens.
    """
    return length - max(1, block_size // 2) if length - start > block_size else start


def filter_logits(logits, temperature, top_k, top_p):
    """One row of logits scaled by 1/temperature, with tokens outside top-k and top-p set to -inf.

    top_k=0 and top_p=1 keep everything. top-p keeps the smallest set of most likely
    tokens (after top-k) whose probability reaches top_p; it always keeps the most likely one.
    """
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab_size = logits.shape[-1]
    descending = -jnp.sort(-logits)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_size), vocab_size)
    in_top_k = jnp.arange(vocab_size) < k
    probs = jax.nn.softmax(jnp.where(in_top_k, descending, -jnp.inf))
    mass_before = jnp.cumsum(probs) - probs
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf))
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _next_token(logits, key, temperature, top_k, top_p):
    sampled = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


# Positions and the token buffer are int32, and the buffer is (samples, prompt + new tokens) on the device.
MAX_NEW_TOKENS = 2**24


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, prompts, lengths, key, temperature, top_k, top_p, end_token, *, cfg, max_new_tokens):
    """prompts (batch, prompt_len) right-padded, lengths (batch,) -> (tokens (batch, total), new counts)."""
    model = model_lib.GPT(cfg)
    batch, prompt_len = prompts.shape
    total = prompt_len + max_new_tokens
    capacity = min(cfg.block_size, total)  # the cache never needs more than the whole sequence
    keep = max(1, cfg.block_size // 2)
    rows = jnp.arange(batch)
    zeros = jnp.zeros((batch,), jnp.int32)

    def forward(tokens, cache, cache_index):
        logits, variables = model.apply({"params": params, "cache": cache}, tokens, cache_index=cache_index,
                                        mutable=["cache"])
        return logits, variables["cache"]

    logits, cache = forward(prompts, model_lib.init_cache(cfg, batch, capacity), zeros)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)  # sample i depends on (seed, i) only
    state = dict(step=jnp.int32(0), tokens=jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompts),
                 length=lengths, start=zeros, cache=cache, logits=logits[rows, lengths - 1],
                 done=jnp.zeros((batch,), bool), num_new=zeros)

    def step(s):
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, s["step"])
        token = jax.vmap(_next_token, (0, 0, None, None, None))(s["logits"], keys, temperature, top_k, top_p)
        ended = token == end_token
        tokens = s["tokens"].at[rows, s["length"]].set(jnp.where(s["done"], 0, token))
        num_new = s["num_new"] + (~s["done"] & ~ended)
        done = s["done"] | ended
        length = s["length"] + 1
        slot = length - 1 - s["start"]  # where the new token goes in the cache
        full = slot >= capacity
        logits, cache = forward(token[:, None], s["cache"], jnp.minimum(slot, capacity - 1))
        logits, cache, start = logits[:, 0], cache, s["start"]

        def rebuild(args):  # rows whose cache is full restart it from their last `keep` tokens
            logits, cache, start = args
            new_start = jnp.maximum(length - keep, 0)
            window = jax.vmap(lambda row, i: jax.lax.dynamic_slice(row, (i,), (keep,)))(tokens, new_start)
            window_logits, window_cache = forward(window, model_lib.init_cache(cfg, batch, capacity), zeros)

            def pick(new, old, axis=0):  # rows of `new` where full, along the batch axis
                return jnp.where(jnp.expand_dims(full, [d for d in range(old.ndim) if d != axis]), new, old)

            pick_cache = lambda new, old: pick(new, old, model_lib.cache_batch_axis(cfg))
            return (pick(window_logits[:, -1], logits), jax.tree.map(pick_cache, window_cache, cache),
                    jnp.where(full, new_start, start))

        if total > cfg.block_size:  # otherwise the cache holds the whole sequence and never fills
            logits, cache, start = jax.lax.cond(jnp.any(full & ~done), rebuild, lambda args: args,
                                                (logits, cache, start))
        return dict(step=s["step"] + 1, tokens=tokens, length=length, start=start, cache=cache,
                    logits=logits, done=done, num_new=num_new)

    def more(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    final = jax.lax.while_loop(more, step, state)
    return final["tokens"], final["num_new"]


def generate(params, cfg: model_lib.GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, end_token: Optional[int] = None,
             seed: int = 0, pad_multiple: int = 1) -> list:
    """Continues each prompt (a sequence of token ids) by up to `max_new_tokens` sampled tokens.

    Returns, per prompt, the new tokens as an int32 array, stopping before `end_token`
    when it is sampled. temperature=0 is greedy decoding. A prompt longer than the
    model's context keeps its last `block_size` tokens, with a warning. `pad_multiple`:
    the batch is right-padded to a multiple of it (padding is never attended to), so
    callers with prompts of many lengths (evaluators) compile once per bucket, not per length.
    """
    if not prompts:
        raise UserError("no prompts to continue: pass at least one prompt")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"max_new_tokens={max_new_tokens} must be between 1 and {MAX_NEW_TOKENS:,} (every new "
                        "token is kept in one int32 buffer on the device): for longer texts sample again with "
                        "the output as the prompt")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
    arrays = []
    for i, prompt in enumerate(prompts):
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise UserError(f"prompt {i} is empty: give every prompt at least one token (some text)")
        if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
            raise UserError(f"prompt {i} has token ids outside the model's vocabulary [0, {cfg.vocab_size}): "
                            "encode it with the tokenizer the model was trained with")
        if prompt.size > cfg.block_size:
            warnings.warn(f"prompt {i} has {prompt.size} tokens, more than the model's context of "
                          f"{cfg.block_size}: keeping its last {cfg.block_size} tokens", stacklevel=2)
            prompt = prompt[-cfg.block_size:]
        arrays.append(prompt.astype(np.int32))
    lengths = np.array([len(p) for p in arrays], np.int32)
    width = max(int(lengths.max()), min(-(-int(lengths.max()) // pad_multiple) * pad_multiple, cfg.block_size))
    padded = np.zeros((len(arrays), width), np.int32)
    for row, prompt in zip(padded, arrays):
        row[:len(prompt)] = prompt
    tokens, num_new = _generate(
        params, padded, lengths, jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
        jnp.float32(top_p), jnp.int32(-1 if end_token is None else end_token), cfg=cfg,
        max_new_tokens=int(max_new_tokens))
    tokens, num_new = jax.device_get((tokens, num_new))
    return [row[n:n + k] for row, n, k in zip(tokens, lengths, num_new)]


@functools.partial(jax.jit, static_argnames="cfg")
def _logits_at(params, tokens, index, *, cfg):
    return model_lib.GPT(cfg).apply({"params": params}, tokens)[0, index]


def greedy_by_recompute(params, cfg: model_lib.GPTConfig, prompt: Sequence[int], max_new_tokens: int,
                        end_token: Optional[int] = None) -> np.ndarray:
    """Greedy decoding without a cache: the full forward pass over the context at every step.

    The reference `generate(temperature=0)` is tested against; slow by design.
    """
    sequence = [int(t) for t in prompt][-cfg.block_size:]
    start, new = 0, []
    for _ in range(max_new_tokens):
        start = window_start(len(sequence), start, cfg.block_size)
        context = sequence[start:]
        # Padded to the full context so one compilation serves every length; the model is causal,
        # so the padding after the last token does not change its logits.
        padded = np.zeros((1, cfg.block_size), np.int32)
        padded[0, :len(context)] = context
        token = int(jnp.argmax(_logits_at(params, padded, len(context) - 1, cfg=cfg)))
        if token == end_token:
            break
        sequence.append(token)
        new.append(token)
    return np.asarray(new, np.int32)
