"""Growing a pretrained model's vocabulary for the chat tokens keeps its old logits exactly."""
import jax
import numpy as np
import pytest
import flax.traverse_util

from gptlab.chat import vocab
from gptlab.model import GPT, GPTConfig, init_params


@pytest.mark.parametrize("tied", [True, False])
def test_growing_keeps_the_old_tokens_logits_and_sets_distinct_new_rows(tied):
    old = GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tied)
    new = GPTConfig(vocab_size=34, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tied)
    params = jax.jit(init_params, static_argnums=0)(old, jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    grown = flax.traverse_util.unflatten_dict(vocab.grow_params(flat, 30, 34, 4, seed=0), sep="/")
    assert grown["wte"]["embedding"].shape == (34, 16)
    if not tied:
        assert grown["lm_head"]["kernel"].shape == (16, 34)
    tokens = np.random.default_rng(0).integers(0, 30, (2, 8))
    before = jax.jit(lambda p, t: GPT(old).apply({"params": p}, t))(params, tokens)
    after = jax.jit(lambda p, t: GPT(new).apply({"params": p}, t))(grown, tokens)
    # Equal up to float32 rounding: a head with more columns may be multiplied in another blocking.
    np.testing.assert_allclose(np.asarray(after[..., :30]), np.asarray(before), rtol=1e-6, atol=1e-6)
    rows = np.asarray(grown["wte"]["embedding"][30:])
    assert len({tuple(r) for r in rows.round(6)}) == 4  # the four roles are told apart
    mean = np.asarray(params["wte"]["embedding"]).mean(0)
    assert np.abs(rows.mean(0) - mean).max() < 3 * np.asarray(params["wte"]["embedding"]).std(0).max()
