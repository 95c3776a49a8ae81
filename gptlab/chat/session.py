"""A multi-turn conversation with a chat model: the template, the key/value cache, token-by-token output.

Each reply renders the whole conversation so far with the chat template, ending
in `<|assistant|>`, prefills the key/value cache in one forward pass, then
decodes one token per step at its cache slot (sampling with `gptlab.sampling`'s
temperature/top-k/top-p filter), handing each token to a callback as it comes,
so a terminal can stream it. A reply ends at `<|end|>` (it stopped by itself) or
after `max_new_tokens` tokens (the cap), or when the context is full. A
conversation longer than the context keeps its latest tokens: the prompt is cut
from the left to leave room for a reply of the cap's length (or half the context).

An imported Hugging Face model (`gptlab.hf_tokenizer`) chats through its own chat
template instead (rendered as `transformers` does), stopping at its eos token.

Prompt lengths are padded to a multiple of PAD_TO (at most the context), so a
conversation compiles the prefill a few times, not once per turn; the decode step
compiles once per model.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptlab import model as model_lib
from gptlab import sampling
from gptlab.chat import template
from gptlab.errors import UserError

PAD_TO = 64


def _sample(logits, key, temperature, top_k, top_p):
    sampled = jax.random.categorical(key, sampling.filter_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def _prefill(params, tokens, length, key, temperature, top_k, top_p, *, cfg):
    """tokens (1, padded) -> (the first reply token, the cache holding the prompt)."""
    cache = model_lib.init_cache(cfg, 1, cfg.block_size)
    logits, variables = model_lib.GPT(cfg).apply({"params": params, "cache": cache}, tokens,
                                                 cache_index=jnp.zeros((1,), jnp.int32), mutable=["cache"])
    return _sample(logits[0, length - 1], key, temperature, top_k, top_p), variables["cache"]


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _step(params, cache, token, index, key, temperature, top_k, top_p, *, cfg):
    """The token at cache slot `index` in, the next token out."""
    logits, variables = model_lib.GPT(cfg).apply({"params": params, "cache": cache}, token.reshape(1, 1),
                                                 cache_index=index.reshape(1), mutable=["cache"])
    return _sample(logits[0, 0], key, temperature, top_k, top_p), variables["cache"]


class ChatSession:
    """The messages so far and the sampling settings; `reply(text)` answers a user turn."""

    def __init__(self, params, cfg: model_lib.GPTConfig, tokenizer, system: str = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int = 50, top_p: float = 1.0, seed: int = 0):
        self.own_template = bool(getattr(tokenizer, "chat_template", None))  # an imported model's Jinja template
        if not isinstance(tokenizer, template.ChatTokenizer) and not self.own_template:
            raise UserError("this model has no chat tokens (it was not fine-tuned for chat): fine-tune it first, "
                            "python -m experiments.finetune --config=configs/finetune.py:full,chat "
                            "--config.finetune.init_from=RUN --workdir=CHAT_RUN")
        if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise UserError("need max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.system, self.max_new_tokens = system, max_new_tokens
        self.settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        self.key = jax.random.key(seed)
        self.turn = 0
        self.end_id = tokenizer.eot_id if self.own_template else tokenizer.end_id
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply_tokens(self, prompt_ids, on_token=None) -> tuple:
        """(new token ids without the closing <|end|>, whether the model ended the turn itself)."""
        cfg = self.cfg
        room = min(self.max_new_tokens, max(1, cfg.block_size // 2))
        prompt_ids = np.asarray(prompt_ids, np.int32)[-(cfg.block_size - room):]
        length = len(prompt_ids)
        padded = min(-(-length // PAD_TO) * PAD_TO, cfg.block_size)
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, :length] = prompt_ids
        key = jax.random.fold_in(self.key, self.turn)
        self.turn += 1
        token, cache = _prefill(self.params, tokens, jnp.int32(length), jax.random.fold_in(key, 0), *self.settings,
                                cfg=cfg)
        new = []
        for i in range(min(self.max_new_tokens, cfg.block_size - length)):
            value = int(token)
            if value == self.end_id:
                return new, True
            new.append(value)
            if on_token is not None:
                on_token(new)
            if length + i + 1 >= cfg.block_size or i + 1 == self.max_new_tokens:
                break
            token, cache = _step(self.params, cache, token, jnp.int32(length + i), jax.random.fold_in(key, i + 1),
                                 *self.settings, cfg=cfg)
        return new, False

    def reply(self, text: str, on_text=None) -> tuple:
        """(the assistant's reply to the user turn `text`, whether it ended by itself); `on_text(new text)`
        is called as the reply grows (streaming)."""
        if not text.strip():
            raise UserError("an empty user turn: type some text")
        self.messages.append({"role": "user", "content": text})
        printed = [0]

        def on_token(ids):
            if on_text is None:
                return
            decoded = self.tokenizer.decode(ids).rstrip("\ufffd")  # a character's bytes may still be coming
            if len(decoded) > printed[0]:
                on_text(decoded[printed[0]:])
                printed[0] = len(decoded)

        prompt = (self.tokenizer.encode(self.tokenizer.render_chat(self.messages)) if self.own_template
                  else template.render_prompt(self.tokenizer, self.messages))
        ids, stopped = self.reply_tokens(prompt, on_token)
        answer = self.tokenizer.decode(ids)
        if on_text is not None and len(answer) > printed[0]:
            on_text(answer[printed[0]:])
        self.messages.append({"role": "assistant", "content": answer or " "})  # the template needs content
        return answer, stopped
