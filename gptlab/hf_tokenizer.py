"""Hugging Face tokenizers for imported models (`experiments.convert --from_hf`), offline.

An imported Llama/Qwen2 folder's `tokenizer.json` is read with the `tokenizers`
library and its `tokenizer_config.json` for the end-of-sequence token and the chat
template. Both are stored inside the run's tokenizer spec (kind `huggingface`,
with a sha256), so the workdir, its checkpoints and every fine-tuning run of it are
self-contained: no download, no path to the original folder.

The interface is gptlab's (`gptlab.tokenizers`): `encode` (text as text:
`add_special_tokens=False`, though special tokens spelled in the text, such as
`<|im_start|>`, are matched, as in `transformers`), `decode` (special tokens
dropped), `eot_id` (the config's `eos_token`), `vocab_size` (with added tokens).
`render_chat(messages, add_generation_prompt)` renders the model's own Jinja chat
template the way `transformers`' `apply_chat_template` does (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, `raise_exception`, and the
config's special tokens as variables).
"""
import hashlib
import json
import pathlib

import numpy as np

from gptlab.errors import UserError

KIND = "huggingface"
CONFIG_KEYS = ("eos_token", "bos_token", "pad_token", "unk_token", "chat_template", "add_bos_token")


def _token_text(value):
    """A tokenizer_config token: a string, or an AddedToken dict with its `content`."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    kind = KIND

    def __init__(self, tokenizer_json: str, config: dict):
        from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

        self.tokenizer_json, self.config = tokenizer_json, {k: config[k] for k in CONFIG_KEYS if k in config}
        self._tok = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = _token_text(self.config.get("eos_token"))
        self.eot_id = self._tok.token_to_id(eos) if eos else None
        if self.eot_id is None:
            raise UserError(f"the Hugging Face tokenizer has no end-of-sequence token ({eos!r} in "
                            "tokenizer_config.json's eos_token is not in its vocabulary): set eos_token there")
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.chat_template = self.config.get("chat_template")

    @classmethod
    def from_dir(cls, directory) -> "HFTokenizer":
        directory = pathlib.Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls((directory / "tokenizer.json").read_text(encoding="utf-8"), config)

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list) -> list:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to `messages`, as `transformers`' apply_chat_template(tokenize=False)."""
        if not self.chat_template:
            raise UserError("this imported model's tokenizer_config.json has no chat_template: it is a base model; "
                            "fine-tune it for chat (configs/finetune.py:STRATEGY,chat) or use experiments.sample")
        import jinja2  # pylint: disable=import-outside-toplevel
        from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

        def raise_exception(message):
            raise UserError(f"the chat template refused the conversation: {message}")

        env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **specials)

    def to_json(self) -> dict:
        return {"kind": KIND, "sha256": hashlib.sha256(self.tokenizer_json.encode("utf-8")).hexdigest(),
                "tokenizer": self.tokenizer_json, "config": self.config}

    @classmethod
    def from_json(cls, spec: dict) -> "HFTokenizer":
        if "tokenizer" not in spec:
            raise UserError("this imported model was converted without its tokenizer (an older gptlab): import it again "
                            "with experiments.convert --from_hf, from a folder holding tokenizer.json")
        if hashlib.sha256(spec["tokenizer"].encode("utf-8")).hexdigest() != spec.get("sha256"):
            raise UserError("the stored Hugging Face tokenizer is damaged (sha256 mismatch): import the model again")
        return cls(spec["tokenizer"], spec.get("config") or {})
