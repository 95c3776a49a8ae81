"""Tokenizers behind one small interface, saved with the run as JSON.

Every tokenizer has `encode(text) -> np.ndarray[int32]`, `encode_batch(texts)`,
`decode(ids) -> str`, `vocab_size`, `eot_id` (the end-of-text token that
separates documents), `special_tokens` ({token: id}) and `to_json()`;
`from_json` rebuilds it exactly, so a resumed or fine-tuning run uses the very
tokenizer its pretraining run used, and `check_matches` refuses a config that
asks for a different one.

| `data.tokenizer` | vocabulary | trained | stored with the run |
| --- | --- | --- | --- |
| `byte` | 256 UTF-8 bytes + `<|endoftext|>` | no | its kind |
| `char` | the training split's characters + `<|endoftext|>`, `<|unk|>` | yes | the characters |
| `sentencepiece` | BPE or unigram pieces, 256 byte pieces, `\\n`, `<|endoftext|>` | yes, on the training split | the model (base64) |
| `gpt2` | GPT-2's BPE (50,257 tokens) through tiktoken | no | the encoding file's path and sha256 |

A run writes its tokenizer to `WORKDIR/tokenizer.json` (and a SentencePiece
model also to `WORKDIR/tokenizer.model`) before training, and into every
checkpoint; a restarted run reuses it instead of training a new one.
"""
import base64
import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Callable, Iterable, Optional, Protocol

import numpy as np

from gptlab import files
from gptlab.errors import UserError

EOT = "<|endoftext|>"
UNK = "<|unk|>"

TOKENIZERS = ("byte", "char", "sentencepiece", "gpt2")
SENTENCEPIECE_TYPES = ("bpe", "unigram")
# Files a run writes into its workdir (written before training starts, so a restart reuses them).
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int
    special_tokens: dict

    def encode(self, text: str, strict: bool = False) -> np.ndarray: ...

    def encode_batch(self, texts: list) -> list: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) plus <|endoftext|> (256). Encodes any text; nothing to train."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256
    special_tokens = {EOT: 256}

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list) -> list:
        return [self.encode(t) for t in texts]

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
    special_tokens = {EOT: 0, UNK: 1}

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

    def encode_batch(self, texts: list) -> list:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids), dtype=np.int64)
        ids = ids[(ids >= 2) & (ids < self.vocab_size)]
        return "".join(self.chars[i - 2] for i in ids)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: text read from files may hold lone surrogates; keep them as characters.
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


class SentencePieceTokenizer:
    """SentencePiece (BPE or unigram) trained on the training split; round-trips any text exactly.

    Trained with identity normalisation, no whitespace folding and no dummy
    prefix, so decode(encode(text)) == text; characters outside the vocabulary
    fall back to their UTF-8 bytes (256 byte pieces), so nothing is ever
    unknown. `\\n` is a piece of its own. Ids: 0 = <unk> (unused), 1 =
    <|endoftext|>, 2 = `\\n`, then byte pieces and learned pieces. SentencePiece
    turns spaces into U+2581 internally, so that character itself is encoded as
    its three byte pieces to keep the round trip exact.
    """

    kind = "sentencepiece"
    eot_id = 1
    _META = "\u2581"

    def __init__(self, model_proto: bytes, model_type: str):
        import sentencepiece as spm  # pylint: disable=import-outside-toplevel

        self.model_proto = bytes(model_proto)
        self.model_type = model_type
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.piece_to_id(EOT) != self.eot_id or not self._sp.is_control(self.eot_id):
            raise UserError("the stored SentencePiece model was not trained by gptlab (no <|endoftext|> at id 1): "
                            "start a fresh --workdir")
        self.special_tokens = {EOT: self.eot_id}
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in self._META.encode("utf-8")]

    @classmethod
    def train(cls, texts: Iterable[str], model_type: str, vocab_size: int, max_chars: int) -> "SentencePieceTokenizer":
        """Trains on at most `max_chars` characters of `texts`, fed line by line."""
        import sentencepiece as spm  # pylint: disable=import-outside-toplevel

        if model_type not in SENTENCEPIECE_TYPES:
            raise UserError(f"data.sentencepiece_type={model_type!r} is not one of {SENTENCEPIECE_TYPES}")
        model = io.BytesIO()
        fed = [0]
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts, max_chars, fed), model_writer=model,
                model_type=model_type, vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, eos_piece=EOT, max_sentence_length=4 * _LINE_CHARS,
                num_threads=_threads(), minloglevel=2)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if not fed[0]:
                raise UserError("cannot train a SentencePiece tokenizer on an empty training split: "
                                "check data.dataset and data.text_key") from None
            raise UserError(f"SentencePiece training failed ({reason}): choose a data.sentencepiece_vocab_size "
                            f"that fits the training split (now {vocab_size})") from None
        return cls(model.getvalue(), model_type)

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list) -> list:
        plain = [i for i, t in enumerate(texts) if self._META not in t]
        out = [None] * len(texts)
        encoded = self._sp.encode([texts[i] for i in plain], num_threads=_threads()) if plain else []
        for i, ids in zip(plain, encoded):
            out[i] = np.asarray(ids, dtype=np.int32)
        for i, text in enumerate(texts):
            if out[i] is None:
                ids = []
                for j, part in enumerate(text.split(self._META)):
                    if j:
                        ids.extend(self._meta_ids)
                    if part:
                        ids.extend(self._sp.encode(part))
                out[i] = np.asarray(ids, dtype=np.int32)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_json(self) -> dict:
        return {"kind": self.kind, "model_type": self.model_type, "vocab_size": self.vocab_size,
                "sha256": hashlib.sha256(self.model_proto).hexdigest(),
                "model": base64.b64encode(self.model_proto).decode("ascii")}


# SentencePiece skips longer training sentences; long lines are cut into pieces of this many characters.
_LINE_CHARS = 4096


def _training_lines(texts: Iterable[str], max_chars: int, fed: list):
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _LINE_CHARS):
                if fed[0] >= max_chars:
                    return
                piece = line[start:start + _LINE_CHARS]
                fed[0] += len(piece)
                yield piece


# GPT-2's byte-level BPE: tiktoken's r50k_base encoding file (whisper ships the same file as gpt2.tiktoken).
GPT2_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_ENCODING_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_NUM_RANKS = 50256


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, from a local copy of its encoding file (no network).

    Ids are GPT-2's: 0-50255 BPE tokens, 50256 = <|endoftext|>. Text is encoded
    as ordinary text: a literal "<|endoftext|>" inside a document is not the
    special token.
    """

    kind = "gpt2"
    vocab_size = GPT2_NUM_RANKS + 1
    eot_id = GPT2_NUM_RANKS
    special_tokens = {EOT: GPT2_NUM_RANKS}

    def __init__(self, encoding_file=None, stored_file=None):
        import tiktoken  # pylint: disable=import-outside-toplevel
        from tiktoken_ext.openai_public import r50k_pat_str  # ships with tiktoken  # pylint: disable=import-outside-toplevel

        self.encoding_file, ranks = _load_gpt2_ranks(encoding_file, stored_file)
        self._encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens=self.special_tokens, explicit_n_vocab=self.vocab_size)

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)

    def encode_batch(self, texts: list) -> list:
        return [np.asarray(ids, dtype=np.int32)
                for ids in self._encoding.encode_ordinary_batch(list(texts), num_threads=_threads())]

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode([int(i) for i in ids if 0 <= int(i) < GPT2_NUM_RANKS])

    def to_json(self) -> dict:
        return {"kind": self.kind, "encoding_sha256": GPT2_ENCODING_SHA256, "encoding_file": str(self.encoding_file)}


def _tiktoken_cache_candidates() -> list:
    """Where tiktoken itself caches the file after `tiktoken.get_encoding("r50k_base")` once had network."""
    key = hashlib.sha1(GPT2_ENCODING_URL.encode()).hexdigest()
    dirs = [os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("DATA_GYM_CACHE_DIR"),
            os.path.join(tempfile.gettempdir(), "data-gym-cache")]
    return [pathlib.Path(d) / key for d in dirs if d]


def _load_gpt2_ranks(encoding_file, stored_file):
    from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel

    how = (f"download {GPT2_ENCODING_URL} (sha256 {GPT2_ENCODING_SHA256[:12]}...) and pass "
           "--config.data.gpt2_encoding_file=/path/to/r50k_base.tiktoken")
    if encoding_file:
        path = pathlib.Path(encoding_file).expanduser()
        if not path.is_file():
            raise UserError(f"data.gpt2_encoding_file={encoding_file} does not exist: {how}")
    else:
        candidates = ([pathlib.Path(stored_file)] if stored_file else []) + _tiktoken_cache_candidates()
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UserError(f"data.tokenizer=gpt2 needs GPT-2's BPE encoding file, which is not on this machine: {how}")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{path} is not a tiktoken encoding file ({type(e).__name__}: {e}): {how}") from None
    # Hash the ranks in the file's own format, so a re-saved copy is recognised too.
    canonical = b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                         for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    if len(ranks) != GPT2_NUM_RANKS or hashlib.sha256(canonical).hexdigest() != GPT2_ENCODING_SHA256:
        raise UserError(f"{path} is not GPT-2's BPE encoding ({len(ranks)} tokens, sha256 "
                        f"{hashlib.sha256(canonical).hexdigest()[:12]}...): {how}")
    return path.absolute(), ranks


def build(data_cfg, train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """Builds the tokenizer `data_cfg` asks for; `train_texts()` yields the training split's texts."""
    kind = data_cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(train_texts())
    if kind == "sentencepiece":
        if data_cfg.sentencepiece_vocab_size < 300:
            raise UserError(f"data.sentencepiece_vocab_size={data_cfg.sentencepiece_vocab_size} is too small: it holds "
                            "256 byte pieces and the special tokens; use at least 300 (e.g. 8192)")
        return SentencePieceTokenizer.train(train_texts(), data_cfg.sentencepiece_type,
                                            data_cfg.sentencepiece_vocab_size, data_cfg.tokenizer_train_chars)
    if kind == "gpt2":
        return GPT2Tokenizer(data_cfg.gpt2_encoding_file)
    raise UserError(f"unknown data.tokenizer={kind!r}: choose one of {TOKENIZERS}")


def from_json(spec: dict, data_cfg=None) -> Tokenizer:
    """The tokenizer `spec` (from `to_json`) describes; `data_cfg` may say where GPT-2's file is here."""
    if "chat_tokens" in spec:  # a chat fine-tuning run's: the base tokenizer plus the chat template's tokens
        from gptlab.chat import template  # pylint: disable=import-outside-toplevel

        if list(spec["chat_tokens"]) != list(template.CHAT_TOKENS):
            raise UserError(f"stored tokenizer has chat tokens {spec['chat_tokens']}: this gptlab version reads "
                            f"{list(template.CHAT_TOKENS)}")
        return template.ChatTokenizer(from_json({k: v for k, v in spec.items() if k != "chat_tokens"}, data_cfg))
    kind = spec.get("kind")
    if kind == "huggingface":  # an imported Llama/Qwen2's own tokenizer (experiments.convert --from_hf)
        from gptlab import hf_tokenizer  # pylint: disable=import-outside-toplevel

        return hf_tokenizer.HFTokenizer.from_json(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "sentencepiece":
        proto = base64.b64decode(spec["model"])
        if hashlib.sha256(proto).hexdigest() != spec["sha256"]:
            raise UserError("the stored SentencePiece model is damaged (sha256 mismatch): start a fresh --workdir")
        return SentencePieceTokenizer(proto, spec["model_type"])
    if kind == "gpt2":
        configured = data_cfg.get("gpt2_encoding_file") if data_cfg is not None else None
        return GPT2Tokenizer(configured, stored_file=spec.get("encoding_file"))
    raise UserError(f"stored tokenizer has unknown kind {kind!r}: this gptlab version reads {TOKENIZERS}")


def fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of everything that determines the token ids (not where files live)."""
    spec = dict(tokenizer.to_json())
    spec.pop("encoding_file", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def describe(tokenizer: Tokenizer) -> str:
    if tokenizer.kind == "sentencepiece":
        return f"sentencepiece ({tokenizer.model_type}, vocab {tokenizer.vocab_size})"
    return tokenizer.kind


def _describe_config(data_cfg) -> str:
    if data_cfg.tokenizer == "sentencepiece":
        return (f"data.tokenizer=sentencepiece with data.sentencepiece_type={data_cfg.sentencepiece_type}, "
                f"data.sentencepiece_vocab_size={data_cfg.sentencepiece_vocab_size}")
    return f"data.tokenizer={data_cfg.tokenizer}"


def mismatch(tokenizer: Tokenizer, data_cfg) -> Optional[str]:
    """None if `tokenizer` is what `data_cfg` asks for, else a description of the difference."""
    same = tokenizer.kind == data_cfg.tokenizer
    if same and tokenizer.kind == "sentencepiece":
        same = (tokenizer.model_type == data_cfg.sentencepiece_type
                and tokenizer.vocab_size == data_cfg.sentencepiece_vocab_size)
    return None if same else f"the {describe(tokenizer)} tokenizer but the config asks for {_describe_config(data_cfg)}"


def check_matches(tokenizer: Tokenizer, data_cfg, where: str,
                  fix: str = "use the same tokenizer settings or a fresh --workdir") -> None:
    """Refuses a config whose tokenizer differs from the one `where` (a run or checkpoint) was trained with.

    Fine-tuning calls it with the pretrained checkpoint's tokenizer: the tokenizer
    of a pretraining run is the one its fine-tuning runs use.
    """
    difference = mismatch(tokenizer, data_cfg)
    if difference:
        raise UserError(f"{where} was trained with {difference}: {fix}")


def save(tokenizer: Tokenizer, workdir) -> None:
    """Writes WORKDIR/tokenizer.json (and a SentencePiece model as WORKDIR/tokenizer.model), atomically."""
    workdir = pathlib.Path(workdir)
    if tokenizer.kind == "sentencepiece":
        files.write_atomic(workdir / SENTENCEPIECE_MODEL, tokenizer.model_proto)
    files.write_json_atomic(workdir / TOKENIZER_JSON, tokenizer.to_json(), indent=None)


def load_or_build(data_cfg, train_texts: Callable[[], Iterable[str]], workdir=None, log: Callable = print,
                  write: bool = True) -> Tokenizer:
    """The workdir's stored tokenizer if it is what the config asks for; otherwise a new one, stored there.

    A run that stopped before its first checkpoint thus restarts with the
    tokenizer it trained, not a retrained one.
    """
    stored = pathlib.Path(workdir) / TOKENIZER_JSON if workdir is not None else None
    if stored is not None and stored.is_file():
        tokenizer = from_json(json.loads(stored.read_text()), data_cfg)
        difference = mismatch(tokenizer, data_cfg)
        if difference is None:
            log(f"tokenizer: reusing {describe(tokenizer)} from {stored}")
            return tokenizer
        log(f"tokenizer: {stored} holds {difference}; the workdir has no checkpoint, so building a new one")
    tokenizer = build(data_cfg, train_texts)
    if stored is not None and write:
        save(tokenizer, workdir)
    return tokenizer
