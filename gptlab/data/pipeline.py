"""Input pipeline: TFDS builder -> documents -> one token stream -> batches of windows.

Documents are tokenised and joined with the end-of-text token into one stream,
which is cut into non-overlapping (seq_len + 1)-token windows (inputs plus the
next-token targets). Training visits the windows epoch by epoch, each epoch in
a permutation drawn from (seed, epoch), so the batch at any position is a pure
function of the seed and the position: the iterator's whole state is one
integer, stored in every checkpoint, and a resumed run sees exactly the
batches the uninterrupted run would have seen. Each process takes its own rows
of every global batch, so hosts never read each other's data.

Why not Grain: the per-batch work is one gather from an in-memory token array,
so worker processes would add start-up cost and nothing else; the sampler
below is the same idea as Grain's index sampler, with its state made explicit.
"""
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from gptlab import tokenizers as tokenizers_lib
from gptlab.data import corpora
from gptlab.errors import UserError

OWN_DATASETS = ("python_stdlib", "text_folder")


def make_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `data.dataset` (not yet prepared)."""
    common = dict(data_dir=data_cfg.data_dir, file_format="array_record")
    include, exclude = tuple(data_cfg.include), tuple(data_cfg.exclude)
    if data_cfg.dataset == "python_stdlib":
        return corpora.PythonStdlib(config=corpora.stdlib_config(include, exclude), **common)
    if data_cfg.dataset == "text_folder":
        if not data_cfg.text_dir:
            raise UserError("data.dataset=text_folder needs data.text_dir=/path/to/your/text/files")
        root = corpora.pathlib.Path(data_cfg.text_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"data.text_dir={data_cfg.text_dir!r} is not a directory: point it at a folder of text files")
        return corpora.TextFolder(
            config=corpora.text_folder_config(root, data_cfg.text_glob, include, exclude), **common)
    try:
        builder = tfds.builder(data_cfg.dataset, **common)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown data.dataset={data_cfg.dataset!r}: use one of {OWN_DATASETS} "
                        "or a TFDS catalog name (see `tfds.list_builders()`)") from None
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot load TFDS dataset {data_cfg.dataset!r}: {_first_line(e)}") from None
    if include or exclude:
        raise UserError(f"data.include/data.exclude select files of {OWN_DATASETS} by path and do not apply "
                        f"to the catalog dataset {data_cfg.dataset!r}: clear them with "
                        "--config.data.include='()' --config.data.exclude='()'")
    return builder


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
    """Prepares the dataset once (a no-op when already prepared) and returns its builder."""
    builder = make_builder(data_cfg)
    download_config = tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # pylint: disable=broad-except
        where = f"cannot prepare dataset {data_cfg.dataset!r} in {builder.data_dir}: {_first_line(e)}"
        if data_cfg.dataset in OWN_DATASETS:
            raise UserError(f"{where}; check data.include/data.exclude and that data.data_dir is writable") from None
        raise UserError(
            f"{where}. Without network access, put the files the builder downloads into data.manual_dir, "
            "or prepare the dataset on a machine with network access and point data.data_dir at it") from None
    return builder


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def read_texts(builder, split: str, text_key: str) -> Iterator[str]:
    """Yields the text of every example of `split`, in the prepared file's order."""
    if split not in builder.info.splits:
        raise UserError(f"dataset {builder.info.full_name!r} has no examples in split {split!r} (it has "
                        f"{sorted(builder.info.splits)}): widen data.include/data.exclude or choose another split")
    source = builder.as_data_source(split=split)
    for start in range(0, len(source), 256):
        for example in source.__getitems__(list(range(start, min(start + 256, len(source))))):
            if text_key not in example:
                raise UserError(f"dataset {builder.name!r} has no feature data.text_key={text_key!r}; "
                                f"its features are {sorted(example)}")
            text = example[text_key]
            yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def tokenize_documents(texts, tokenizer) -> np.ndarray:
    """One token stream: every document followed by the end-of-text token."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces = []
    for text in texts:
        pieces.append(tokenizer.encode(text).astype(dtype))
        pieces.append(eot)
    return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


class WindowBatches:
    """Global batches of (seq_len + 1)-token windows in a seeded, checkpointable order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                            f"data.seq_len+1={seq_len + 1}: use more data or a shorter data.seq_len")
        if batch_size % process_count:
            raise UserError(f"data.batch_size={batch_size} is not divisible by the {process_count} processes")
        self.local_rows = slice(process_index * batch_size // process_count,
                                (process_index + 1) * batch_size // process_count)
        self.position = 0  # windows consumed so far, over all epochs
        self._orders = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 1:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._orders[epoch]

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """The windows at global positions (epoch * num_windows + index) as int32 arrays."""
        epochs, offsets = np.divmod(positions, self.num_windows)
        starts = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            starts[at] = self._order(int(epoch))[offsets[at]] * self.seq_len
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        positions = self.position + np.arange(self.batch_size, dtype=np.int64)
        self.position += self.batch_size
        return {"tokens": self.windows(positions[self.local_rows])}

    def state(self) -> dict:
        return {"position": int(self.position), "num_windows": int(self.num_windows),
                "seq_len": int(self.seq_len), "seed": int(self.seed)}

    def restore(self, state: dict) -> None:
        for key in ("num_windows", "seq_len", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"the checkpoint's data iterator was at {key}={state[key]} but the current data gives "
                    f"{key}={getattr(self, key)}: the dataset, tokenizer, seq_len or seed changed since the "
                    "run started; restore the original data config or start a fresh --workdir")
        self.position = int(state["position"])


class Data:
    """Everything training needs from the data config: tokenizer, train and eval batches."""

    def __init__(self, data_cfg, seq_len: int, seed: int, tokenizer=None,
                 process_index: int = 0, process_count: int = 1, log: Callable = print):
        start = time.perf_counter()
        builder = prepare(data_cfg)
        texts = lambda split: read_texts(builder, split, data_cfg.text_key)
        self.tokenizer = tokenizer or tokenizers_lib.build(data_cfg.tokenizer, lambda: texts(data_cfg.train_split))
        self.train_tokens = tokenize_documents(texts(data_cfg.train_split), self.tokenizer)
        self.eval_tokens = tokenize_documents(texts(data_cfg.eval_split), self.tokenizer)
        seconds = time.perf_counter() - start
        num_tokens = len(self.train_tokens) + len(self.eval_tokens)
        log(f"data: {builder.info.full_name} ({data_cfg.train_split}: {len(self.train_tokens):,} tokens, "
            f"{data_cfg.eval_split}: {len(self.eval_tokens):,} tokens, {self.tokenizer.kind} tokenizer, "
            f"vocab {self.tokenizer.vocab_size}) prepared and tokenised in {seconds:.1f}s "
            f"({num_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
        self.train = WindowBatches(self.train_tokens, seq_len, data_cfg.batch_size, seed,
                                   process_index, process_count)
        self._eval_args = (seq_len, data_cfg.batch_size, seed)
        self._process = (process_index, process_count)

    def eval_batches(self, num_batches: int) -> list:
        if len(self.eval_tokens) <= self._eval_args[0]:
            raise UserError(f"the evaluation split has only {len(self.eval_tokens)} tokens, fewer than one "
                            "window: use a larger dataset or a shorter data.seq_len")
        seq_len, batch_size, seed = self._eval_args
        sampler = WindowBatches(self.eval_tokens, seq_len, batch_size, seed, *self._process)
        return [next(sampler) for _ in range(num_batches)]
