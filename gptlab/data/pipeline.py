"""Input pipeline: TFDS builder -> documents -> one token stream -> batches of windows.

Documents are tokenised and joined with the end-of-text token into one stream,
tokenised once and kept in the token cache (memory-mapped; see token_cache),
which is cut into non-overlapping (seq_len + 1)-token windows (inputs plus the
next-token targets). Training visits the windows epoch by epoch, each epoch in
a permutation drawn from (seed, epoch), so the batch at any position is a pure
function of the seed and the position: the iterator's whole state is one
integer, stored in every checkpoint, and a resumed run sees exactly the
batches the uninterrupted run would have seen. Each process takes its own rows
of every global batch, so hosts never read each other's data.

Why not Grain: the per-batch work is one gather from a (memory-mapped) token array,
so worker processes would add start-up cost and nothing else; the sampler
below is the same idea as Grain's index sampler, with its state made explicit.
"""
import math
import pathlib
import queue
import sys
import threading
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from gptlab import lock as lock_lib
from gptlab import tokenizers as tokenizers_lib
from gptlab.data import catalog, corpora, task_corpora, token_cache
from gptlab.errors import UserError

OWN_DATASETS = ("python_stdlib", "python_stdlib_docstrings", "text_folder", "python_stdlib_functions",
                "python_stdlib_packages", "python_stdlib_blocks")


EVAL_SEED = 0  # the evaluation windows' sampler seed, the same for every run


def make_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `data.dataset` (not yet prepared)."""
    common = dict(data_dir=data_cfg.data_dir, file_format="array_record")
    include, exclude = tuple(data_cfg.include), tuple(data_cfg.exclude)
    decoding = dict(encoding=data_cfg.get("encoding", "utf-8"), decode_errors=data_cfg.get("decode_errors", "strict"))
    if data_cfg.dataset in ("python_stdlib", "text_folder"):
        corpora.check_decoding(**decoding)
    if data_cfg.dataset == "python_stdlib":
        return corpora.PythonStdlib(config=corpora.stdlib_config(include, exclude, **decoding), **common)
    if data_cfg.dataset == "python_stdlib_docstrings":  # English prose: the transfer study's pretraining corpus
        return corpora.PythonStdlibDocstrings(config=corpora.stdlib_config(include, exclude), **common)
    if data_cfg.dataset == "python_stdlib_blocks":  # fine-tuning task lm on held-out code
        return task_corpora.PythonStdlibBlocks(config=corpora.stdlib_config(include, exclude), **common)
    if data_cfg.dataset == "python_stdlib_functions":  # fine-tuning task sft
        return task_corpora.PythonStdlibFunctions(config=corpora.stdlib_config(include, exclude), **common)
    if data_cfg.dataset == "python_stdlib_packages":  # fine-tuning task classify
        packages = tuple(data_cfg.get("packages", task_corpora.DEFAULT_PACKAGES))
        return task_corpora.PythonStdlibPackages(
            config=task_corpora.packages_config(packages, include, exclude), **common)
    if data_cfg.dataset == "text_folder":
        if not data_cfg.text_dir:
            raise UserError("data.dataset=text_folder needs data.text_dir=/path/to/your/text/files")
        root = corpora.pathlib.Path(data_cfg.text_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"data.text_dir={data_cfg.text_dir!r} is not a directory: point it at a folder of text files")
        return corpora.TextFolder(
            config=corpora.text_folder_config(root, data_cfg.text_glob, include, exclude, **decoding), **common)
    builder = catalog.make_builder(data_cfg.dataset, data_cfg.data_dir)
    if include or exclude:
        raise UserError(f"data.include/data.exclude select files of {OWN_DATASETS} by path and do not apply "
                        f"to the catalog dataset {data_cfg.dataset!r}: clear them with "
                        "--config.data.include='()' --config.data.exclude='()'")
    return builder


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
    """Prepares the dataset once (a no-op when already prepared) and returns its builder.

    Processes that share a data dir (parallel sweep cells, several runs started at once)
    prepare each dataset one at a time: the first writes it under a lock, the others wait
    and then read what it wrote (TFDS alone would let each write a copy and fail all but
    the first at the final rename).
    """
    builder = make_builder(data_cfg)
    if builder.is_prepared():
        return builder
    lock_path = _prepare_lock_path(builder)
    if lock_path is None:  # a remote data dir (gs://...): no local lock to take
        _prepare(builder, data_cfg)
        return builder
    held = lock_lib.wait_for(lock_path, on_wait=lambda holder: print(
        f"waiting for {holder}, which is preparing {builder.info.full_name} in {builder.data_dir_root}",
        file=sys.stderr, flush=True))
    try:
        builder = make_builder(data_cfg)  # reads what another process prepared while this one waited
        if not builder.is_prepared():
            _prepare(builder, data_cfg)
    finally:
        held.release()
    return builder


def _prepare_lock_path(builder):
    """The file that serialises preparing this dataset version, beside it in the data dir (None if remote)."""
    root = str(builder.data_dir_root)
    if "://" in root:
        return None
    root = pathlib.Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data dir {root}: {e.strerror}; set data.data_dir to a writable "
                        "directory") from None
    return root / f".{builder.info.full_name.replace('/', '-')}.prepare.lock"


def _prepare(builder, data_cfg) -> None:
    if data_cfg.dataset not in OWN_DATASETS:
        catalog.prepare(builder, data_cfg.manual_dir)
        return
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except UserError:  # e.g. a file that does not decode: the message names it and the fix
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot prepare dataset {data_cfg.dataset!r} in {builder.data_dir}: {catalog.first_line(e)}; "
                        "check data.include/data.exclude and that data.data_dir is writable") from None


def read_texts(builder, split: str, text_key: str) -> Iterator[str]:
    """Yields the text of every example of `split`, in the prepared file's order.

    `split` may use TFDS split syntax: `validation+test`, `train[:10%]`.
    """
    check_split(builder, split)
    if catalog.has_random_access(builder):
        source = builder.as_data_source(split=split)
        examples = (example for start in range(0, len(source), 256)
                    for example in source.__getitems__(list(range(start, min(start + 256, len(source))))))
    else:
        examples = catalog.iterate_numpy(builder, split)
    for example in _damage_reported(examples, builder, split):
        if text_key not in example:
            raise UserError(f"dataset {builder.name!r} has no feature data.text_key={text_key!r}; "
                            f"its features are {sorted(example)}")
        text = example[text_key]
        yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _damage_reported(examples, builder, split: str):
    """`examples`, with a prepared file that fails to read (e.g. "Corrupted Riegeli/records file": a
    truncated or overwritten array_record) reported in one line naming the folder to delete."""
    try:
        yield from examples
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"the prepared dataset {builder.info.full_name} ({split}) in {builder.data_dir} cannot be read "
                        f"({catalog.first_line(e)}): it is damaged; delete {builder.data_dir} and rerun to prepare "
                        "it again") from None


def check_split(builder, split: str) -> None:
    for part in split.split("+"):
        name = part.split("[")[0]
        if name not in builder.info.splits:
            raise UserError(f"dataset {builder.info.full_name!r} has no examples in split {name!r} (it has "
                            f"{sorted(builder.info.splits)}): widen data.include/data.exclude or choose another split")


def tokenize_documents(texts, tokenizer) -> np.ndarray:
    """One token stream: every document followed by the end-of-text token."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces = []
    for text in texts:
        pieces.append(tokenizer.encode(text).astype(dtype))
        pieces.append(eot)
    return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def take_fraction(tokens: np.ndarray, fraction: float) -> np.ndarray:
    """The first `fraction` of a training token stream (at least one token), in the prepared order.

    A prefix, so subsets are nested (1% inside 10% inside 100%) and the same for
    every seed; the tokenizer and the token cache still cover the whole split.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"data.train_fraction={fraction} must be in (0, 1]: e.g. 0.1 trains on the first 10% "
                        "of the training split's tokens")
    return tokens[:max(1, math.ceil(len(tokens) * fraction))]


class SeededOrder:
    """Items visited epoch by epoch in a permutation drawn from (seed, epoch).

    The items at a position are a pure function of (seed, position), so a
    checkpoint stores one integer and a resumed run sees exactly the batches of
    an uninterrupted one. Each process takes its own rows of every global batch.
    With `shift_range`, each epoch also draws an offset in [0, shift_range).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shift_range: int = 0):
        if batch_size % process_count:
            raise UserError(f"data.batch_size={batch_size} is not divisible by the {process_count} processes")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shift_range = shift_range
        self.local_rows = slice(process_index * batch_size // process_count,
                                (process_index + 1) * batch_size // process_count)
        self.position = 0  # items consumed so far, over all epochs
        self._orders = {}

    def _order(self, epoch: int) -> tuple:
        """(permutation of the items, offset) of `epoch`."""
        if epoch not in self._orders:
            if len(self._orders) > 1:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_items)
            self._orders[epoch] = (order, int(rng.integers(self.shift_range)) if self.shift_range else 0)
        return self._orders[epoch]

    def _next_positions(self) -> np.ndarray:
        """This process's global positions in the next batch; advances past the whole global batch."""
        positions = self.position + np.arange(self.batch_size, dtype=np.int64)
        self.position += self.batch_size
        return positions[self.local_rows]

    def __iter__(self):
        return self

    def _restore(self, state: dict, keys: tuple, could_have_changed: str) -> None:
        for key in keys:
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"the checkpoint's data iterator was at {key}={state.get(key)} but the current data gives "
                    f"{key}={getattr(self, key)}: {could_have_changed} changed since the run started; "
                    "restore the original data config or start a fresh --workdir")
        self.position = int(state["position"])


class WindowBatches(SeededOrder):
    """Global batches of (seq_len + 1)-token windows in a seeded, checkpointable order.

    With `shift`, each epoch also moves the whole window grid by a random offset
    in [0, seq_len) drawn from (seed, epoch): many epochs over a small corpus
    then see windows starting anywhere, as nanoGPT's random crops do, while the
    batch at a position stays a pure function of seed and position.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, shift: bool = False):
        self.tokens = tokens
        self.seq_len = seq_len
        self.shift = bool(shift)
        # A shifted grid must still fit: leave room for an offset of up to seq_len - 1.
        num_windows = (len(tokens) - 1 - (seq_len - 1 if shift else 0)) // seq_len
        if num_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                            f"data.seq_len+1={seq_len + 1}: use more data (a larger data.train_fraction) "
                            "or a shorter data.seq_len")
        super().__init__(num_windows, batch_size, seed, process_index, process_count,
                         shift_range=seq_len if shift else 0)

    @property
    def num_windows(self) -> int:
        return self.num_items

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """The windows at global positions (epoch * num_windows + index) as int32 arrays."""
        epochs, offsets = np.divmod(positions, self.num_windows)
        starts = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            order, offset = self._order(int(epoch))
            starts[at] = order[offsets[at]] * self.seq_len + offset
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)

    def __next__(self) -> dict:
        return {"tokens": self.windows(self._next_positions())}

    def state(self) -> dict:
        return {"position": int(self.position), "num_windows": int(self.num_windows),
                "seq_len": int(self.seq_len), "seed": int(self.seed), "shift": self.shift}

    def restore(self, state: dict) -> None:
        state = {"shift": False, **state}  # checkpoints from before shifting existed
        self._restore(state, ("num_windows", "seq_len", "seed", "shift"),
                      "the dataset, tokenizer, seq_len, seed or shift_windows")


class Data:
    """Everything training needs from the data config: tokenizer, train and eval batches.

    The tokenizer is `tokenizer` (a resumed run's, from its checkpoint), else the
    one stored in `workdir` by an earlier start, else built (and stored there).
    Token streams come memory-mapped from the token cache (see token_cache),
    tokenised only when the cache lacks them.
    """

    def __init__(self, data_cfg, seq_len: int, seed: int, tokenizer=None,
                 process_index: int = 0, process_count: int = 1, log: Callable = print, workdir=None):
        start = time.perf_counter()
        builder = prepare(data_cfg)
        for split in (data_cfg.train_split, data_cfg.eval_split):
            check_split(builder, split)
        note = corpora.decoding_note(builder) if data_cfg.dataset in ("python_stdlib", "text_folder") else None
        if note:
            log(note)
        prepared = time.perf_counter()
        texts = lambda split: read_texts(builder, split, data_cfg.text_key)
        writer = process_index == 0
        self.tokenizer = tokenizer or tokenizers_lib.load_or_build(
            data_cfg, lambda: texts(data_cfg.train_split), workdir, log=log, write=writer)
        trained = time.perf_counter()
        cache_dir = token_cache.default_dir(builder, data_cfg.get("cache_dir"))
        streams, self.cache_stats = {}, {}
        splits = [("train", data_cfg.train_split), ("eval", data_cfg.eval_split)]
        test_split = data_cfg.get("test_split")
        if test_split and test_split.split("[")[0] in builder.info.splits:  # reported only, never chosen on
            splits.append(("test", test_split))
        elif test_split:
            log(f"data: {builder.info.full_name} has no split {test_split!r} (data.test_split): no test metrics")
        for name, split in splits:
            streams[name], stats = token_cache.load_or_build(
                cache_dir, builder, split, data_cfg.text_key, self.tokenizer, lambda s=split: texts(s), log, writer)
            how = (f"memory-mapped from the token cache in {stats['seconds']:.2f}s" if stats["cached"] else
                   f"tokenised in {stats['seconds']:.1f}s ({stats['tokens_per_sec']:,.0f} tokens/s)"
                   + (f", cached in {stats['path']}" if stats["path"] else ""))
            log(f"data: {builder.info.full_name} {split}: {stats['num_tokens']:,} tokens, {how}")
            self.cache_stats[name] = stats
        self.train_tokens, self.eval_tokens = streams["train"], streams["eval"]
        self.test_tokens = streams.get("test")
        fraction = data_cfg.get("train_fraction", 1.0)
        if fraction != 1.0:  # data-size ablations; the eval split is never cut
            self.train_tokens = take_fraction(self.train_tokens, fraction)
            log(f"data: data.train_fraction={fraction}: training on the first {len(self.train_tokens):,} "
                f"of {len(streams['train']):,} tokens")
        log(f"data: {tokenizers_lib.describe(self.tokenizer)} tokenizer, vocab {self.tokenizer.vocab_size}; "
            f"prepared in {prepared - start:.1f}s, tokenizer ready in {trained - prepared:.1f}s, "
            f"tokens ready in {time.perf_counter() - trained:.1f}s")
        self.train = WindowBatches(self.train_tokens, seq_len, data_cfg.batch_size, seed,
                                   process_index, process_count, shift=data_cfg.get("shift_windows", False))
        # EVAL_SEED, not the run's seed: eval_loss must measure the model, not which windows were drawn,
        # so runs that differ only in seed (sweeps' "mean ± std over seeds") are scored on the same data.
        self._eval_args = (seq_len, data_cfg.batch_size, EVAL_SEED)
        self._process = (process_index, process_count)

    def eval_batches(self, num_batches: int, tokens=None) -> list:
        tokens = self.eval_tokens if tokens is None else tokens
        if len(tokens) <= self._eval_args[0]:
            raise UserError(f"the evaluation split has only {len(tokens)} tokens, fewer than one "
                            "window: use a larger dataset or a shorter data.seq_len")
        seq_len, batch_size, seed = self._eval_args
        sampler = WindowBatches(tokens, seq_len, batch_size, seed, *self._process)
        return [next(sampler) for _ in range(num_batches)]

    def test_batches(self, num_batches: int):
        """Fixed batches of the test split, drawn as the evaluation batches are; None without one."""
        if self.test_tokens is None or len(self.test_tokens) <= self._eval_args[0]:
            return None
        if num_batches is None:  # the whole split: as many windows as its tokens fill (drawn as eval windows are)
            seq_len, batch_size, _ = self._eval_args
            num_batches = math.ceil(len(self.test_tokens) / (seq_len * batch_size))
        return self.eval_batches(num_batches, self.test_tokens)


class Prefetch:
    """Reads `ahead` batches in advance in a background thread, applying `place` there.

    With `place` the device transfer, the step never waits for the host: while the
    devices run step t, the thread prepares and copies the batches of the next steps.
    `state()` is the wrapped iterator's position after the batches handed out so far,
    not after those read ahead, so checkpoints and resumes are exactly as without it.
    """

    def __init__(self, batches, ahead: int, place: Callable = lambda batch: batch):
        self.batches, self.ahead, self.place = batches, ahead, place
        self._state = batches.state()
        self._error = None
        self._start()

    def _start(self):
        self._queue = queue.Queue(maxsize=self.ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="gptlab-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self):
        try:
            while self._put((self.place(next(self.batches)), self.batches.state())):
                pass
        except BaseException as e:  # pylint: disable=broad-except  # StopIteration too: raised in order
            self._put((e, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        batch, state = self._queue.get()
        if state is None:
            self._error = batch
            raise batch
        self._state = state
        return batch

    def state(self):
        return self._state

    def restore(self, state) -> None:
        self.close()
        self.batches.restore(state)
        self._state, self._error = self.batches.state(), None
        self._start()

    def close(self) -> None:
        """Stops the thread; batches read ahead are dropped (the wrapped iterator is past them)."""
        self._stop.set()
        self._thread.join()
