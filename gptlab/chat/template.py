"""The chat template: four turn-boundary tokens added to any gptlab tokenizer, and the loss mask.

A conversation renders as

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

`<|endoftext|>` opens it (a pretrained model has seen it before every document).
The four chat tokens take the ids just after the base tokenizer's vocabulary
(byte: 257-260, GPT-2: 50257-50260, char and SentencePiece: vocab_size + 0..3),
so the base tokenizer's ids never move and a pretrained model only grows
(`gptlab.chat.vocab`). They are inserted by the template only: text that spells
"<|end|>" encodes as ordinary text, so a user cannot forge a turn boundary.

The loss mask (nanochat's `render_conversation`, TRL's assistant-only loss)
covers every assistant turn's text and its closing `<|end|>`, so the model
learns to stop; never the opening `<|assistant|>`, system or user text. For
generation the prompt ends with `<|assistant|>` and sampling stops at `<|end|>`.
"""
import numpy as np

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ChatTokenizer:
    """A gptlab tokenizer plus the chat tokens at ids base.vocab_size .. base.vocab_size + 3.

    Same interface as the tokenizers of `gptlab.tokenizers`; `to_json` is the base's
    with `chat_tokens` added, which `tokenizers.from_json` reads back into this class.
    """

    def __init__(self, base):
        self.base = base
        self.kind = base.kind
        self.base_vocab_size = base.vocab_size
        self.vocab_size = base.vocab_size + len(CHAT_TOKENS)
        self.eot_id = base.eot_id
        self.chat_ids = {token: base.vocab_size + i for i, token in enumerate(CHAT_TOKENS)}
        self.special_tokens = {**base.special_tokens, **self.chat_ids}
        self.end_id = self.chat_ids[END]
        for name in ("model_type", "model_proto"):  # describe() and save() read these of SentencePiece
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return self.base.encode(text, strict)

    def encode_batch(self, texts: list) -> list:
        return self.base.encode_batch(texts)

    def decode(self, ids) -> str:
        return self.base.decode([int(i) for i in ids if int(i) < self.base_vocab_size])

    def to_json(self) -> dict:
        return {**self.base.to_json(), "chat_tokens": list(CHAT_TOKENS)}


def with_chat_tokens(tokenizer) -> ChatTokenizer:
    """`tokenizer` with the chat tokens (itself if it has them already)."""
    return tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)


def render(tokenizer: ChatTokenizer, messages: list, encoded: list = None):
    """(ids, mask) of a whole conversation: mask[i] = 1 where token i is assistant text or its closing <|end|>.

    `encoded`: the messages' contents already encoded (a list of id arrays), for batch encoding.
    """
    if encoded is None:
        encoded = tokenizer.encode_batch([m["content"] for m in messages])
    ids, mask = [np.array([tokenizer.eot_id], np.int32)], [np.zeros(1, np.int32)]
    for message, content in zip(messages, encoded):
        assistant = int(message["role"] == "assistant")
        ids += [np.array([tokenizer.chat_ids[ROLES[message["role"]]]], np.int32), np.asarray(content, np.int32),
                np.array([tokenizer.end_id], np.int32)]
        mask += [np.zeros(1, np.int32), np.full(len(content), assistant, np.int32), np.array([assistant], np.int32)]
    return np.concatenate(ids), np.concatenate(mask)


def render_prompt(tokenizer: ChatTokenizer, messages: list) -> np.ndarray:
    """The ids that ask for the next assistant turn: the conversation so far, then <|assistant|>."""
    ids, _ = render(tokenizer, messages) if messages else (np.array([tokenizer.eot_id], np.int32), None)
    return np.concatenate([ids, [tokenizer.chat_ids[ASSISTANT]]]).astype(np.int32)


def keep_answer(ids: np.ndarray, mask: np.ndarray, length: int) -> tuple:
    """(ids, mask) no longer than `length` where they can be, cut from the left of the prompt so the first
    assistant turn starts inside the window: tokens after the opening <|endoftext|> go first, never the
    <|assistant|> token that opens the first answer nor anything after it (what still does not fit is then
    cut from the right by `to_example`). A long prompt thus costs context, not the answer (as TRL's
    truncation_mode="keep_end" does for the prompt)."""
    excess = len(ids) - length
    answer = np.flatnonzero(mask)
    if excess <= 0 or not len(answer):
        return ids, mask
    drop = min(excess, int(answer[0]) - 2)  # keep ids[0] and the <|assistant|> at answer[0] - 1
    if drop <= 0:
        return ids, mask
    return np.concatenate([ids[:1], ids[1 + drop:]]), np.concatenate([mask[:1], mask[1 + drop:]])


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int):
    """(tokens (seq_len + 1,), weights (seq_len,)): cut or padded; weights[j] is the mask of target j + 1.

    Truncation cuts ids and mask together, so a cut assistant turn keeps exactly its
    surviving tokens in the loss (without its <|end|>, which fell outside).
    """
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    tokens = np.full(seq_len + 1, pad_id, np.int32)
    tokens[:len(ids)] = ids
    weights = np.zeros(seq_len, np.float32)
    weights[:len(ids) - 1] = mask[1:]
    return tokens, weights
