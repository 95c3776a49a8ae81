"""Direct Preference Optimization (Rafailov et al., 2023) and IPO (Azar et al., 2023) as a loss function.

For a prompt x with a chosen answer y_w and a rejected one y_l, the implicit
rewards are r = beta * (log pi(y|x) - log pi_ref(y|x)), and

    sigmoid (DPO):  loss = -log sigmoid(r_w - r_l)
    ipo:            loss = (h - 1 / (2 beta))^2,  h = the log-ratio difference of
                    per-token mean log-probabilities (IPO's length normalisation, as TRL does)

log pi(y|x) sums the log-probabilities of the answer's tokens and its closing
<|end|> (the chat template's assistant mask), never the prompt's.

The reference pi_ref is the starting checkpoint, frozen. Its log-probabilities do
not change during training, so `gptlab.chat.data.PreferenceData` computes them
once, before the first step, and carries them in the batches (TRL's
`precompute_ref_log_probs`): the train step is the shared pure step with this loss,
and no second copy of the parameters is held while training, whatever the strategy.
For LoRA this is exactly "the same parameters with the adapters off": the adapters
start at B = 0, so the starting model is the base model.

Metrics (summed per pair; evaluation reports them averaged as eval_*): loss,
reward_margin (r_w - r_l), accuracy (share of pairs with r_w > r_l, the preference
accuracy; 0 at the start, where every margin is 0), chosen_logp and rejected_logp
(the policy's summed log-probabilities), prefers_chosen (share of pairs where the
policy itself gives the chosen answer the higher log-probability: comparable across
stages, base and SFT included, though summed log-probabilities favour short answers).
"""
import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo")


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid"):
    """Per-pair (loss, chosen reward, rejected reward) from sequence log-probabilities (any shape)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: choose one of {LOSSES}")
    return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def sequence_logps(logits, targets, weights):
    """(sum, count) over each row of the log-probabilities of `targets` where `weights` is 1."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * weights, axis=-1), jnp.sum(weights, axis=-1)


def per_token(logps, counts):
    return logps / jnp.maximum(counts, 1.0)


def loss_fn(model, beta: float, loss_type: str = "sigmoid"):
    """A `steps.LossFn` for preference batches: chosen_/rejected_ tokens (B, T+1) and weights (B, T),
    ref_chosen/ref_rejected (B,) the reference's log-probabilities, weights (B,) 1 per real pair."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}: choose one of {LOSSES}")

    def fn(params, batch, dropout_key):
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
        masks = jnp.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
        rngs = {} if dropout_key is None else {"dropout": dropout_key}
        logits = model.apply({"params": params}, tokens[:, :-1], deterministic=dropout_key is None, rngs=rngs)
        logps, counts = sequence_logps(logits, tokens[:, 1:], masks)
        chosen, rejected = jnp.split(logps, 2)
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        if loss_type == "ipo":
            chosen_n, rejected_n = jnp.split(counts, 2)
            policy = (per_token(chosen, chosen_n), per_token(rejected, rejected_n))
            ref = (per_token(ref_chosen, chosen_n), per_token(ref_rejected, rejected_n))
        else:
            policy, ref = (chosen, rejected), (ref_chosen, ref_rejected)
        losses, chosen_reward, rejected_reward = preference_loss(*policy, *ref, beta, loss_type)
        w = batch["weights"]
        return jnp.sum(losses * w), {
            "count": jnp.sum(w), "tokens": jnp.float32(tokens[:, :-1].size),
            "reward_margin": jnp.sum((chosen_reward - rejected_reward) * w),
            "accuracy": jnp.sum((chosen_reward > rejected_reward) * w),
            "chosen_logp": jnp.sum(chosen * w), "rejected_logp": jnp.sum(rejected * w),
            "prefers_chosen": jnp.sum((chosen > rejected) * w)}

    return fn
