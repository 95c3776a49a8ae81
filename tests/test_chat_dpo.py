"""DPO/IPO: the loss against an independent implementation of TRL's formula; the loss function on a model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptlab.chat import dpo
from gptlab.model import GPT, GPTConfig, init_params


def trl_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type):
    """TRL's DPOTrainer.dpo_loss (label_smoothing 0), written out in plain Python floats."""
    out = []
    for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        logits = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":  # -log(sigmoid(beta * logits)), computed stably
            z = beta * logits
            loss = math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))
        else:  # ipo
            loss = (logits - 1 / (2 * beta)) ** 2
        out.append((loss, beta * (pc - rc), beta * (pr - rr)))
    return out


@pytest.mark.parametrize("loss_type", dpo.LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_loss_equals_trls_formula_on_fixed_log_probabilities(loss_type, beta):
    rng = np.random.default_rng(0)
    # Multiples of 1/256: exact in float32, so the log-ratio differences are exact and only the loss itself rounds.
    logps = [np.round(rng.uniform(-80.0, -5.0, 16) * 256) / 256 for _ in range(4)]
    logps[0][:3] = logps[2][:3] + [30.0, -30.0, 0.0]  # large margins both ways, and none
    losses, chosen_r, rejected_r = jax.jit(dpo.preference_loss, static_argnums=(4, 5))(
        *[jnp.asarray(x, jnp.float32) for x in logps], beta, loss_type)
    want = trl_reference(*[x.astype(np.float32).astype(float) for x in logps], beta, loss_type)
    for got, expected in zip(zip(np.asarray(losses, float), np.asarray(chosen_r, float), np.asarray(rejected_r, float)),
                             want):
        for g, e in zip(got, expected):
            assert abs(g - e) <= 1e-6 * max(1.0, abs(e)), (g, e)  # float32 in: relative past magnitude 1


def test_loss_fn_starts_at_log_two_and_matches_per_pair_log_probabilities():
    cfg = GPTConfig(vocab_size=40, block_size=12, n_layer=1, n_head=2, n_embd=16)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = {f"{side}_tokens": jnp.asarray(rng.integers(0, 40, (3, 13)), jnp.int32) for side in ("chosen", "rejected")}
    mask = np.zeros((3, 12), np.float32)
    mask[:, 6:] = 1  # the answer: the last six targets
    batch.update(chosen_weights=jnp.asarray(mask), rejected_weights=jnp.asarray(mask),
                 weights=jnp.asarray([1.0, 1.0, 0.0]))  # the last row is padding

    def logps(tokens):  # written out: log-softmax of the logits at each answer target, summed
        logits = GPT(cfg).apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return np.asarray((picked * mask).sum(-1))

    batch["ref_chosen"], batch["ref_rejected"] = jnp.asarray(logps(batch["chosen_tokens"])), jnp.asarray(
        logps(batch["rejected_tokens"]))
    loss, sums = jax.jit(dpo.loss_fn(GPT(cfg), beta=0.1), static_argnums=2)(params, batch, None)
    assert float(sums["count"]) == 2  # padding counts nowhere
    np.testing.assert_allclose(float(loss), 2 * math.log(2), rtol=1e-5)  # policy == reference
    np.testing.assert_allclose(float(sums["reward_margin"]), 0.0, atol=1e-4)
    np.testing.assert_allclose(float(sums["chosen_logp"]), logps(batch["chosen_tokens"])[:2].sum(), rtol=1e-5)
    # Moving the reference shifts the loss exactly as the formula says.
    shifted = dict(batch, ref_rejected=batch["ref_rejected"] + 5.0)
    loss, _ = jax.jit(dpo.loss_fn(GPT(cfg), beta=0.1), static_argnums=2)(params, shifted, None)
    np.testing.assert_allclose(float(loss), 2 * -math.log(1 / (1 + math.exp(-0.5))), rtol=1e-5)
