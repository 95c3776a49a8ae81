"""The language-model loss computed three ways in a preset's real train step, timed in ONE process.

    python dev/loss_ab.py PRESET [BLOCKS] [STEPS_PER_BLOCK]      # e.g. gpt2_124m on a GPU (check 4 of gpu_checks.sh)

For a GPU loan: on an H200 about a fifth of gpt2_124m's step is passes over the 32x1024x50304
logits (docs/speed.md, "GPU"). Each variant below is a loss function in place of `steps_lib.lm_loss_fn`,
with the same model, optimizer, parameters and batches:
- `optax`: what training runs: logits in the compute dtype, converted to float32, optax's cross-entropy;
- `f32_logits`: the tied head's matmul writes float32 logits itself (`preferred_element_type`), so
  there is no separate conversion pass;
- `fused`: a cross-entropy whose forward pass also computes the logits' gradient (softmax minus
  one-hot, in the logits' dtype) and keeps only that, as llm.c's fused classifier does, so the
  backward pass reads the logits' gradient once and no float32 copy is kept.

The variants are compiled, then timed in alternating blocks (the order reversed every other
block), so a slow moment slows all alike. Prints each variant's first loss and how far its gradient
is from optax's (relative to the largest; both must agree to the compute dtype's rounding), its median step time, tokens/s and MFU, and per block the first
variant's step time over its own (above 1: faster than `optax`). Nothing here changes training:
a variant that wins on a GPU becomes a config choice only with its measurement.
On a CPU (to check the tool itself): `python dev/loss_ab.py tiny 2 2`.
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import pretrain  # noqa: E402
from gptlab import benchmark  # noqa: E402
from gptlab import peak as peak_lib  # noqa: E402
from gptlab import experiment as experiment_lib
from gptlab import steps as steps_lib


@jax.custom_vjp
def fused_cross_entropy(logits, targets):
    """Per-token cross-entropy (float32) of `logits` (..., vocab) against int `targets` (...)."""
    return _fused_forward(logits, targets)[0]


def _fused_forward(logits, targets):
    z = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(z, axis=-1)
    losses = log_norm - jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    # d loss / d logits = softmax - one_hot: computed here, in the logits' dtype, and all the backward keeps.
    grad = (jnp.exp(z - log_norm[..., None]) - jax.nn.one_hot(targets, z.shape[-1], dtype=jnp.float32))
    return losses, grad.astype(logits.dtype)


def _fused_backward(grad, cotangent):
    return grad * cotangent[..., None].astype(grad.dtype), None


fused_cross_entropy.defvjp(_fused_forward, _fused_backward)


def loss_fn(model, variant: str):
    """`steps_lib.lm_loss_fn(model)` with the logits and cross-entropy of `variant` (no weights: pretraining)."""
    if variant == "optax":
        return steps_lib.lm_loss_fn(model)

    def fn(params, batch, dropout_key):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        if variant == "f32_logits":
            hidden = model.apply({"params": params}, inputs, deterministic=dropout_key is None, rngs=rngs,
                                 return_hidden=True)
            if "lm_head" in params:
                head, spec = params["lm_head"]["kernel"], "btd,dv->btv"
            else:
                head, spec = params["wte"]["embedding"], "btd,vd->btv"
            logits = jnp.einsum(spec, hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        else:
            logits = model.apply({"params": params}, inputs, deterministic=dropout_key is None, rngs=rngs)
            losses = fused_cross_entropy(logits, targets)
        return jnp.sum(losses), {"count": jnp.float32(losses.size), "tokens": jnp.float32(losses.size)}

    return fn


VARIANTS = ("optax", "f32_logits", "fused")


def main(preset="gpt2_124m", blocks=4, per_block=5):
    config = pretrain.get_config(preset)
    exp, parallel = benchmark.synthetic_experiment(config, lambda line: print(line, file=sys.stderr))
    model = experiment_lib.training_model(config.model.get("dense_backward"), experiment_lib.resolve_model_config(config, exp.tokenizer))
    batches = experiment_lib.prefetched(config, exp.batches, parallel)
    steps, states, losses = {}, {}, {}
    for name in VARIANTS:
        states[name], steps[name], _ = experiment_lib.init_and_compile(
            config, dataclasses.replace(exp, loss_fn=loss_fn(model, name)), parallel)
    first_batch = next(batches)
    # The variants' gradients at the initial parameters on one batch must agree, not only their losses.
    gradient = lambda name: jax.jit(jax.grad(lambda p: loss_fn(model, name)(p, first_batch, None)[0]))(
        states[name].params)
    reference = jax.tree.leaves(gradient(VARIANTS[0]))
    scale = max(float(jnp.max(jnp.abs(g))) for g in reference)
    differences = {name: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(reference, jax.tree.leaves(gradient(name))))
                   / scale for name in VARIANTS}
    for name in VARIANTS:  # compiles; the same first batch for all, so the losses must agree
        states[name], metrics = steps[name](states[name], first_batch)
        losses[name] = float(metrics["train_loss"])

    def step(name):
        begin = time.perf_counter()
        states[name], metrics = steps[name](states[name], next(batches))
        jax.block_until_ready((states[name], metrics))
        return time.perf_counter() - begin

    for name in VARIANTS:
        step(name)
    medians = {name: [] for name in VARIANTS}
    for block in range(blocks):
        for name in (VARIANTS if block % 2 == 0 else VARIANTS[::-1]):
            medians[name].append(float(np.median([step(name) for _ in range(per_block)])))
    tokens = config.data.batch_size * experiment_lib.resolve_seq_len(config)
    peak, peak_source = peak_lib.total_peak_tflops(config.train.peak_tflops)
    first = np.array(medians[VARIANTS[0]])
    print(f"{preset} on {jax.devices()[0].device_kind}, {tokens} tokens a step, peak {peak:.3g} TFLOP/s ({peak_source})")
    for name, times in medians.items():
        median = float(np.median(times))
        mfu = exp.flops_per_token * tokens / median / 1e12 / peak
        print(f"{name:11s} first loss {losses[name]:.5f}, gradient's largest difference from optax's "
              f"{differences[name]:.1e}; median step {median * 1e3:.1f} ms, "
              f"{tokens / median:,.0f} tokens/s, MFU {mfu:.3f}; optax's step over this one, per block: "
              f"{np.round(first / np.array(times), 3).tolist()}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["gpt2_124m"]), *(int(a) for a in sys.argv[2:4]))
