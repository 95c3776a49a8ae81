"""Room for the chat tokens in a pretrained model: its token embedding (and an untied head) grown.

A model pretrained with a gptlab tokenizer has no rows for the chat tokens (ids
base_vocab .. base_vocab + 3, `gptlab.chat.template`). Fine-tuning for chat grows
`wte/embedding` (vocab, d) and an untied `lm_head/kernel` (d, vocab) to
`model.vocab_size = base_vocab + 4` (a vocabulary padded past that, such as GPT-2's
50304, keeps its size: those unused rows are reset the same way). Each new row is
the mean of the base vocabulary's rows plus Gaussian noise with their per-coordinate
standard deviation: the mean keeps a new token's logit near the average one
(Hewitt's and Hugging Face's mean resizing), and the noise keeps the four tokens apart
from one another, which matters when the strategy freezes the embedding (LoRA,
head): the roles must still be told apart. The old rows are untouched, so the
logits of the old tokens are exactly the pretrained model's.
"""
import jax
import jax.numpy as jnp

from gptlab import model as model_lib
from gptlab.chat import template


def chat_growth(tokenizer_json: dict):
    """(base vocabulary, base vocabulary + the chat tokens) for a checkpoint's tokenizer without chat tokens, else None."""
    if "chat_tokens" in tokenizer_json:
        return None
    from gptlab import tokenizers  # pylint: disable=import-outside-toplevel  (tokenizers imports gptlab.chat lazily)

    base = tokenizers.from_json(tokenizer_json).vocab_size
    return base, base + len(template.CHAT_TOKENS)


def vocab_axes(paths) -> dict:
    """{path: vocabulary axis} of the parameters with a row (column) per token: the embedding and an untied head."""
    axes = {}
    for path, info in model_lib.describe_paths(paths).items():
        if info.role == "embedding":
            axes[path] = 0
        elif info.role == "head" and path.endswith("/kernel"):
            axes[path] = 1
    return axes


def grow(array, axis: int, new_size: int, start: int, stop: int, key):
    """`array` padded along `axis` to `new_size`, entries start..stop-1 set to mean + std * noise of 0..start-1."""
    array = jnp.asarray(array)
    old = jnp.moveaxis(array, axis, 0).astype(jnp.float32)
    base = old[:start]
    mean, std = base.mean(axis=0), base.std(axis=0)
    noise = jax.random.normal(key, (stop - start, *base.shape[1:]), jnp.float32)
    grown = jnp.concatenate([old, jnp.zeros((new_size - old.shape[0], *old.shape[1:]), jnp.float32)])
    grown = grown.at[start:stop].set(mean + std * noise)
    return jnp.moveaxis(grown, 0, axis).astype(array.dtype)


def grow_params(flat: dict, base_vocab: int, new_size: int, num_new: int, seed: int) -> dict:
    """The flat ({path: array}) parameters with every vocabulary-sized array grown by `grow`; the rest as given."""
    out = dict(flat)
    for i, (path, axis) in enumerate(sorted(vocab_axes(flat).items())):
        out[path] = grow(flat[path], axis, new_size, base_vocab, base_vocab + num_new,
                         jax.random.fold_in(jax.random.key(seed), i))
    return out
