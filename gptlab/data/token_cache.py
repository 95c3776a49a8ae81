"""Token arrays cached on disk and memory-mapped: a corpus is tokenised once, like nanoGPT's .bin files.

One pair of files per (dataset, split, text feature, tokenizer), under
`data.cache_dir` (default: `DATA_DIR/gptlab_token_cache/`, beside the prepared
TFDS data):

    <dataset full name>/<split>-<key>.bin    the split's token stream (documents joined by
                                             end-of-text) as raw uint16 (or int32 for large vocabularies)
    <dataset full name>/<split>-<key>.json   what it holds: dataset, split, tokenizer, num_tokens,
                                             dtype, bytes, sha256, and the preprocessing tokens/s

The key hashes the dataset's full name (builder config and version) and split
sizes, the text feature and the tokenizer's fingerprint (for SentencePiece the
model itself), so a different tokenizer or a re-prepared dataset gets its own
file. The .bin is written to a temporary name and renamed, and the .json is
written after it, so a crash leaves no half-file that looks complete; a .bin
whose size or sha256 does not match its .json is rebuilt.
"""
import hashlib
import json
import os
import pathlib
import time
import uuid
from typing import Callable, Iterable

import numpy as np

from gptlab import files
from gptlab import tokenizers as tokenizers_lib
from gptlab.errors import UserError

FORMAT_VERSION = 1
DEFAULT_SUBDIR = "gptlab_token_cache"
# Documents are tokenised in batches (threads inside SentencePiece and tiktoken) of at most this many characters.
BATCH_CHARS = 8 << 20
BATCH_DOCS = 4096


def default_dir(builder, cache_dir=None) -> pathlib.Path:
    if cache_dir:
        return pathlib.Path(cache_dir).expanduser()
    root = str(builder.data_dir_root)
    if "://" in root:
        raise UserError(f"the TFDS data dir {root} is not a local directory, where token arrays can be memory-mapped: "
                        "set data.cache_dir to a local directory")
    return pathlib.Path(root) / DEFAULT_SUBDIR


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32)


def describe_source(builder, split: str, text_key: str, tokenizer) -> dict:
    """Everything the cached tokens depend on; its hash is the cache key."""
    parts = {}
    for part in split.split("+"):
        name = part.split("[")[0]
        info = builder.info.splits[name]
        parts[part] = {"num_examples": int(info.num_examples), "num_bytes": int(info.num_bytes),
                       "shard_lengths": [int(n) for n in info.shard_lengths]}
    return {"format": FORMAT_VERSION, "dataset": builder.info.full_name, "split": split, "split_sizes": parts,
            "text_key": text_key, "tokenizer": tokenizers_lib.describe(tokenizer),
            "tokenizer_fingerprint": tokenizers_lib.fingerprint(tokenizer), "dtype": token_dtype(tokenizer).name}


def paths(directory: pathlib.Path, source: dict):
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]
    folder = directory / source["dataset"]
    safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in source["split"])
    return folder / f"{safe_split}-{key}.bin", folder / f"{safe_split}-{key}.json"


def load_or_build(directory, builder, split: str, text_key: str, tokenizer,
                  texts: Callable[[], Iterable[str]], log: Callable = print, write: bool = True):
    """The split's token stream, memory-mapped from the cache; tokenised and cached first if needed.

    Returns (tokens, stats) with stats = {"cached": bool, "num_tokens", "seconds",
    "tokens_per_sec", "path"}; `write=False` (processes other than the first)
    tokenises in memory when the cache is missing instead of writing it.
    """
    source = describe_source(builder, split, text_key, tokenizer)
    bin_path, meta_path = paths(pathlib.Path(directory), source)
    start = time.perf_counter()
    tokens, problem = _load(bin_path, meta_path, source)
    if tokens is not None:
        seconds = time.perf_counter() - start
        return tokens, {"cached": True, "num_tokens": len(tokens), "seconds": seconds,
                        "tokens_per_sec": len(tokens) / max(seconds, 1e-9), "path": str(bin_path)}
    if problem:
        log(f"token cache {bin_path} {problem}: tokenising again")
    if not write:
        tokens = np.concatenate(list(_token_chunks(texts(), tokenizer)) or [np.zeros(0, token_dtype(tokenizer))])
        seconds = time.perf_counter() - start
        return tokens, {"cached": False, "num_tokens": len(tokens), "seconds": seconds,
                        "tokens_per_sec": len(tokens) / max(seconds, 1e-9), "path": None}
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        meta = _build(bin_path, meta_path, source, texts, tokenizer, start)
    except OSError as e:
        raise UserError(f"cannot write the token cache in {bin_path.parent} ({e.strerror or e}): set "
                        "data.cache_dir to a writable local directory") from None
    tokens, problem = _load(bin_path, meta_path, source, verify=False)
    return tokens, {"cached": False, "num_tokens": meta["num_tokens"], "seconds": meta["seconds"],
                    "tokens_per_sec": meta["tokens_per_sec"], "path": str(bin_path)}


def _load(bin_path: pathlib.Path, meta_path: pathlib.Path, source: dict, verify: bool = True):
    """(memory-mapped tokens, None) if the cache is complete and intact, else (None, what is wrong or None)."""
    if not meta_path.is_file():
        return None, ("has no description (an interrupted write)" if bin_path.exists() else None)
    try:
        meta = json.loads(meta_path.read_text())
        num_tokens, dtype, expected = int(meta["num_tokens"]), np.dtype(meta["dtype"]), meta["sha256"]
    except (ValueError, KeyError, TypeError):
        return None, "has an unreadable description"
    if meta.get("source") != source:
        return None, "describes different data"
    if not bin_path.is_file() or bin_path.stat().st_size != num_tokens * dtype.itemsize:
        return None, f"is damaged (expected {num_tokens * dtype.itemsize:,} bytes)"
    if verify and _sha256(bin_path) != expected:
        return None, "is damaged (sha256 mismatch)"
    if num_tokens == 0:
        return np.zeros((0,), dtype), None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)), None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _batches(texts: Iterable[str]):
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _token_chunks(texts: Iterable[str], tokenizer):
    """One array per batch of documents: each document's tokens followed by end-of-text."""
    dtype = token_dtype(tokenizer)
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    for batch in _batches(texts):
        pieces = []
        for ids in tokenizer.encode_batch(batch):
            pieces.append(ids.astype(dtype))
            pieces.append(eot)
        yield np.concatenate(pieces)


def _build(bin_path, meta_path, source, texts, tokenizer, start) -> dict:
    tmp = bin_path.with_name(f".{bin_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    digest, num_tokens = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in _token_chunks(texts(), tokenizer):
                data = chunk.tobytes()
                f.write(data)
                digest.update(data)
                num_tokens += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        meta_path.unlink(missing_ok=True)  # the old description must not vouch for the new file
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    meta = {"source": source, "num_tokens": num_tokens, "dtype": source["dtype"],
            "bytes": num_tokens * np.dtype(source["dtype"]).itemsize, "sha256": digest.hexdigest(),
            "seconds": round(seconds, 3), "tokens_per_sec": round(num_tokens / max(seconds, 1e-9))}
    files.write_json_atomic(meta_path, meta)
    return meta
