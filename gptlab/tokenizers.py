"""Tokenizers behind one small interface, saved with the run as JSON.

Every tokenizer has `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`,
`vocab_size`, `eot_id` (the end-of-text token that separates documents) and
`to_json()`; `from_json` rebuilds it exactly, so a resumed or fine-tuning run
uses the very tokenizer its pretraining run used.
"""
from typing import Iterable, Protocol

import numpy as np

from gptlab.errors import UserError

EOT = "<|endoftext|>"
UNK = "<|unk|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str, strict: bool = False) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus <|endoftext|> (256). Encodes any text; nothing to train."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


class CharTokenizer:
    """One id per Unicode character seen in the training split.

    Ids: 0 = <|endoftext|>, 1 = <|unk|> (a character absent from the training
    split), then the characters in code-point order.
    """

    kind = "char"
    eot_id = 0
    unk_id = 1

    def __init__(self, chars: str):
        codepoints = np.array(sorted({ord(c) for c in chars}), dtype=np.uint32)
        self._codepoints = codepoints
        self.chars = "".join(map(chr, codepoints))
        self.vocab_size = 2 + len(codepoints)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen = set()
        for text in texts:
            seen.update(np.unique(_codepoints(text)).tolist())
        if not seen:
            raise UserError("cannot build a character vocabulary from an empty training split: "
                            "check data.dataset and its include/exclude patterns")
        return cls("".join(map(chr, sorted(seen))))

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        points = _codepoints(text)
        index = np.searchsorted(self._codepoints, points)
        index = np.minimum(index, len(self._codepoints) - 1)
        known = self._codepoints[index] == points
        if strict and not known.all():
            bad = sorted({chr(p) for p in points[~known]})[:5]
            raise UserError(f"characters {bad!r} are not in the character vocabulary of this run: "
                            "remove them from the text, or use data.tokenizer=byte")
        return np.where(known, index + 2, self.unk_id).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids), dtype=np.int64)
        ids = ids[(ids >= 2) & (ids < self.vocab_size)]
        return "".join(self.chars[i - 2] for i in ids)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: text read from files may hold lone surrogates; keep them as characters.
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


TOKENIZERS = ("byte", "char")


def build(kind: str, train_texts) -> Tokenizer:
    """Builds a tokenizer of `kind`; `train_texts()` yields the training split's texts."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(train_texts())
    raise UserError(f"unknown data.tokenizer={kind!r}: choose one of {TOKENIZERS}")


def from_json(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    raise UserError(f"stored tokenizer has unknown kind {kind!r}: this gptlab version reads {TOKENIZERS}")
