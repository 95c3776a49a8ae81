"""The DPO reference model: the starting checkpoint, frozen, as a function of tokens (see gptlab/chat/dpo.py).

It is grown for the chat tokens exactly as the trained model is at its start
(`gptlab.chat.vocab.grow_params`, same seed), so at step 0 policy and reference
agree and the DPO loss is log 2.
"""
import dataclasses

import flax.traverse_util

from gptlab import convert, lora
from gptlab.chat import data as chat_data
from gptlab.chat import template, vocab
from gptlab.errors import UserError


class ReferenceModel:
    """The DPO reference: the starting checkpoint (grown for the chat tokens like the trained model),
    as `(tokens, weights) -> summed log-probabilities`; loaded at the first call, freed with the object."""

    def __init__(self, seed: int, source, log):
        self.seed, self.source, self.log = seed, source, log
        self.params = self.cfg = None

    def __call__(self, tokens, weights):
        if self.params is None:
            source, growth = self.source, vocab.chat_growth(self.source.tokenizer_json)
            flat = flax.traverse_util.flatten_dict(source.reader.restore_params(), sep="/")
            if any(lora.is_adapter(p) for p in flat):
                raise UserError(f"{source.where} holds LoRA adapters: use the merged export it wrote, "
                                "--config.finetune.init_from=THAT_RUN/merged")
            size = int(source.shapes["wte/embedding"][0])
            if growth:
                size = max(size, growth[1])
                flat = vocab.grow_params(flat, growth[0], size, len(template.CHAT_TOKENS), self.seed)
            self.params = flax.traverse_util.unflatten_dict(flat, sep="/")
            self.cfg = dataclasses.replace(convert.model_config(source.config), vocab_size=size, dropout=0.0)
            self.log(f"DPO reference: {source.directory / str(source.step)}, log-probabilities computed once")
        return chat_data.reference_logps(self.params, self.cfg, tokens, weights)
