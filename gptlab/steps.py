"""One train state and the pure steps every experiment compiles: the loss, the train step, the eval step.

No I/O, no config: `make_train_step(loss_fn, tx, schedule, ...)` returns the function that
`gptlab.parallel` compiles once (jit over a mesh, or pmap); metrics come back as summed arrays
(`metrics_from_sums` turns them into means).
"""
from collections import defaultdict
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptlab import model as model_lib
from gptlab.adapt import TASK_HEAD


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # raw key data (jax.random.key_data), so it checkpoints as a plain array


# A loss function: (params, batch, dropout_key or None) -> (summed loss, dict of sums incl. "count").
# Sums rather than means make gradient accumulation and data parallelism exact for any split,
# also when examples carry different numbers of target tokens (masked losses). Optional sums:
# "tokens" (input tokens processed, for throughput; default "count") and any metric to be
# averaged over "count" at evaluation (e.g. "accuracy" -> eval_accuracy).
LossFn = Callable[[Any, dict, Any], tuple]


def lm_loss_fn(model: model_lib.GPT) -> LossFn:
    """Next-token cross-entropy; `batch["weights"]` (0/1 per target), if present, masks targets."""

    def loss_fn(params, batch, dropout_key):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        logits = model.apply({"params": params}, inputs, deterministic=dropout_key is None, rngs=rngs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        weights = batch.get("weights", jnp.ones_like(losses))
        return jnp.sum(losses * weights), {"count": jnp.sum(weights), "tokens": jnp.float32(losses.size)}

    return loss_fn


def classify_loss_fn(model: model_lib.GPT) -> LossFn:
    """Cross-entropy of `cls_head` on the final hidden state of each row's last real token (GPT-1)."""

    def loss_fn(params, batch, dropout_key):
        body = {k: v for k, v in params.items() if k != TASK_HEAD}
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        hidden = model.apply({"params": body}, batch["tokens"], deterministic=dropout_key is None, rngs=rngs,
                             return_hidden=True)
        last = jnp.take_along_axis(hidden, (batch["lengths"] - 1)[:, None, None], axis=1)[:, 0]
        head = params[TASK_HEAD]
        logits = last.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        weights = batch["weights"]
        predicted = jnp.argmax(logits, axis=-1)
        correct = (predicted == batch["labels"]).astype(jnp.float32)
        num_classes = logits.shape[-1]  # confusion[true, predicted]: macro-F1 at evaluation (steps_lib.evaluate)
        confusion = (jax.nn.one_hot(batch["labels"], num_classes) * weights[:, None]).T @ jax.nn.one_hot(
            predicted, num_classes)
        return jnp.sum(losses * weights), {"count": jnp.sum(weights), "accuracy": jnp.sum(correct * weights),
                                           "confusion": confusion, "tokens": jnp.float32(batch["tokens"].size)}

    return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, axis_name=None, trainable=None):
    """The pure train step: (state, batch) -> (state, metrics). Compile it with jit or pmap.

    The batch is split into `grad_accum_steps` micro-batches along axis 0; loss
    and gradient sums are accumulated (and summed over `axis_name` under pmap)
    and divided by the total target count once, so the update depends only on
    the global batch. Dropout keys are fold_in(rng, step) (and micro-batch index).

    With a `trainable` bool tree (fine-tuning), gradients are taken only with
    respect to those parameters: the frozen ones enter the loss as constants, so
    autodiff computes no weight gradients for them (and no backward pass below
    the lowest trainable layer); `tx` sees zeros for them and they are carried
    into the new state untouched, bit for bit.
    """

    def split(params):  # (differentiated, constant) parts; None marks the other part's leaves
        if trainable is None:
            return params, None
        return (jax.tree.map(lambda p, t: p if t else None, params, trainable),
                jax.tree.map(lambda p, t: None if t else p, params, trainable))

    def join(diff, const):
        if const is None:
            return diff
        return jax.tree.map(lambda d, c: c if d is None else d, diff, const, is_leaf=lambda x: x is None)

    value_and_grad = jax.value_and_grad(
        lambda diff, const, batch, key: loss_fn(join(diff, const), batch, key), has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        diff, const = split(state.params)
        grad_fn = lambda batch, key: value_and_grad(diff, const, batch, key)
        if grad_accum_steps == 1:
            (loss_sum, sums), grads = grad_fn(batch, key)
        else:
            # Micro-batch i takes rows i, i+k, i+2k, ...: every device's rows spread evenly over
            # the micro-batches, so no device idles when the batch axis is sharded.
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                (loss, sums), grads = grad_fn(micro_batch, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(lambda: (*grad_fn(first, key)[0], diff)))
            (loss_sum, sums, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        if axis_name is not None:
            loss_sum, sums, grads = jax.lax.psum((loss_sum, sums, grads), axis_name)
        # A batch with nothing to learn (chat: no assistant token in any row) has zero loss and gradients:
        # dividing by 1 instead of 0 keeps them zero, never NaN.
        count = jnp.where(sums["count"] > 0, sums["count"], 1.0)
        grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
        full_grads = join(grads, jax.tree.map(jnp.zeros_like, const))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = join(optax.apply_updates(diff, split(updates)[0]), const)
        metrics = {"train_loss": loss_sum / count, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "tokens": sums.get("tokens", count)}
        # The loss's other scalar sums (DPO: reward margin, preference accuracy, ...) as per-count means.
        metrics.update({f"train_{k}": v / count for k, v in sums.items()
                        if k not in ("count", "tokens") and jnp.ndim(v) == 0})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(loss_fn: LossFn, axis_name=None):
    """(params, batch) -> summed loss and counts, dropout off; the host averages over batches."""

    def eval_step(params, batch):
        loss_sum, sums = loss_fn(params, batch, None)
        out = {"loss_sum": loss_sum, **sums}
        return jax.lax.psum(out, axis_name) if axis_name is not None else out

    return eval_step


def evaluate(eval_step, params, batches, prefix: str = "eval") -> dict:
    """Metrics over `batches` (see `metrics_from_sums`), keys starting with `prefix`_."""
    return metrics_from_sums(sum_batches(eval_step, params, batches), prefix)


def sum_batches(eval_step, params, batches) -> dict:
    totals = defaultdict(float)
    for batch in batches:
        for key, value in jax.device_get(eval_step(params, batch)).items():
            totals[key] = totals[key] + np.asarray(value, np.float64)
    return dict(totals)


def metrics_from_sums(totals: dict, prefix: str = "eval") -> dict:
    """Loss, perplexity, every other sum averaged per count, and from a summed `confusion`
    matrix (classification) the macro-averaged F1. The same at training time and in evaluate."""
    loss = float(totals["loss_sum"] / totals["count"])
    metrics = {f"{prefix}_loss": loss, f"{prefix}_perplexity": float(np.exp(min(loss, 700.0)))}
    for key, value in totals.items():
        if key == "confusion":
            metrics[f"{prefix}_macro_f1"] = macro_f1(value)
        elif key not in ("loss_sum", "count", "tokens"):
            metrics[f"{prefix}_{key}"] = float(value / totals["count"])
    return metrics


def macro_f1(confusion) -> float:
    """Unweighted mean over classes of F1 from a confusion matrix (rows: true, columns: predicted).

    A class that is neither present nor predicted counts as F1 = 0 only if it is present
    or predicted; classes absent from both are left out of the mean.
    """
    confusion = np.asarray(confusion, np.float64)
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    seen = (support + predicted) > 0
    f1 = np.divide(2 * true_pos, support + predicted, out=np.zeros_like(true_pos), where=seen)
    return float(f1[seen].mean()) if seen.any() else 0.0
