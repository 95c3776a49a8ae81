"""Input pipelines for the supervised fine-tuning tasks: one example per row.

`sft`: (prompt, response) pairs become `prompt + response + <|endoftext|>`, cut
or padded to seq_len + 1 tokens, with a 0/1 weight per target that is 1 only on
response tokens (and the closing end-of-text), so `steps.lm_loss_fn` learns the
response and never the prompt. Examples whose prompt takes more than
MAX_PROMPT_FRACTION of the window are skipped (and counted in the log).

`classify`: text becomes its first seq_len - 1 tokens plus <|endoftext|>, the
token whose final hidden state the classification head reads (GPT-1's "extract"
token); `lengths` locates it.

Training batches come from `ExampleBatches`: rows visited epoch by epoch in a
permutation drawn from (seed, epoch), with the same checkpointable state as
`pipeline.WindowBatches` (one integer position), so resumed fine-tuning runs
see exactly the batches of an uninterrupted one. Evaluation uses a fixed
selection (the same for every seed) of up to eval_batches * batch_size validation examples; the
last batch is padded with rows of weight 0, which count nowhere.

Datasets: the project's `python_stdlib_functions` / `python_stdlib_packages`
(gptlab/data/task_corpora.py), or any TFDS dataset with the features named by
`data.prompt_key`/`data.response_key` (sft) or `data.text_key`/`data.label_key`
(classify; the label must be a `ClassLabel`).
"""
import time
from typing import Callable

import numpy as np

from gptlab.data import pipeline
from gptlab.errors import UserError

MAX_PROMPT_FRACTION = 0.75  # at least a quarter of every window is response


def read_examples(builder, split: str, keys) -> list:
    """The features `keys` of every example of `split`, text decoded, in the prepared file's order."""
    if split not in builder.info.splits:
        raise UserError(f"dataset {builder.info.full_name!r} has no examples in split {split!r} (it has "
                        f"{sorted(builder.info.splits)}): widen data.include/data.exclude or choose another split")
    source = builder.as_data_source(split=split)
    examples = []
    for start in range(0, len(source), 256):
        for example in source.__getitems__(list(range(start, min(start + 256, len(source))))):
            missing = [k for k in keys if k not in example]
            if missing:
                raise UserError(f"dataset {builder.name!r} has no feature {missing[0]!r} (data.*_key); "
                                f"its features are {sorted(example)}")
            examples.append({k: _decode(example[k]) for k in keys})
    return examples


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if hasattr(value, "item") else value


def encode_sft(tokenizer, prompt: str, response: str, seq_len: int):
    """(tokens (seq_len + 1,), weights (seq_len,)) or None when the prompt is too long."""
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) > MAX_PROMPT_FRACTION * seq_len or len(prompt_ids) == 0:
        return None
    ids = np.concatenate([prompt_ids, tokenizer.encode(response), [tokenizer.eot_id]])[:seq_len + 1]
    tokens = np.full(seq_len + 1, tokenizer.eot_id, np.int32)
    tokens[:len(ids)] = ids
    weights = np.zeros(seq_len, np.float32)
    weights[len(prompt_ids) - 1:len(ids) - 1] = 1.0  # targets at positions len(prompt) .. len(ids) - 1
    return tokens, weights


def encode_classify(tokenizer, text: str, seq_len: int):
    """(tokens (seq_len,), length): the text's first seq_len - 1 tokens, then <|endoftext|>."""
    ids = np.concatenate([tokenizer.encode(text)[:seq_len - 1], [tokenizer.eot_id]])
    tokens = np.full(seq_len, tokenizer.eot_id, np.int32)
    tokens[:len(ids)] = ids
    return tokens, len(ids)


class ExampleBatches(pipeline.SeededOrder):
    """Global batches of rows of `arrays` (a dict of equally long arrays) in a seeded, checkpointable order."""

    def __init__(self, arrays: dict, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.arrays = arrays
        num_examples = len(next(iter(arrays.values())))
        if num_examples < 1:
            raise UserError("the training split has no usable examples: widen data.include/data.exclude")
        super().__init__(num_examples, batch_size, seed, process_index, process_count)

    @property
    def num_examples(self) -> int:
        return self.num_items

    def __next__(self) -> dict:
        epochs, offsets = np.divmod(self._next_positions(), self.num_examples)
        rows = np.array([self._order(int(e))[0][o] for e, o in zip(epochs, offsets)], dtype=np.int64)
        return {k: v[rows] for k, v in self.arrays.items()}

    def state(self) -> dict:
        return {"position": int(self.position), "num_examples": int(self.num_examples), "seed": int(self.seed)}

    def restore(self, state: dict) -> None:
        self._restore(state, ("num_examples", "seed"), "the dataset, tokenizer, seq_len or seed")


def fixed_batches(arrays: dict, batch_size: int, num_batches: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> list:
    """Up to num_batches batches of distinct examples (a seeded selection); padding rows have weight 0.
    num_batches None: every example once."""
    num_examples = len(next(iter(arrays.values())))
    take = np.random.default_rng([seed, 1 << 20]).permutation(num_examples)
    if num_batches is not None:
        take = take[:batch_size * num_batches]
    padded = -(-len(take) // batch_size) * batch_size
    batches = []
    for start in range(0, padded, batch_size):
        rows = take[start:start + batch_size]
        batch = {k: v[np.resize(rows, batch_size)] for k, v in arrays.items()}
        real = np.arange(batch_size) < len(rows)
        batch["weights"] = batch["weights"] * real.reshape(-1, *[1] * (batch["weights"].ndim - 1))
        local = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        batches.append({k: v[local] for k, v in batch.items()})
    return batches


class SupervisedData:
    """What training needs from the data config for task `sft` or `classify`: train and eval batches."""

    def __init__(self, task: str, data_cfg, seq_len: int, seed: int, tokenizer,
                 process_index: int = 0, process_count: int = 1, log: Callable = print):
        start = time.perf_counter()
        builder = pipeline.prepare(data_cfg)
        self.tokenizer = tokenizer
        self.task = task
        self.class_names = None
        if task == "classify":
            feature = builder.info.features[data_cfg.label_key] if data_cfg.label_key in builder.info.features else None
            if not hasattr(feature, "num_classes"):
                raise UserError(f"data.label_key={data_cfg.label_key!r} is not a class label of dataset "
                                f"{builder.info.full_name!r}: name its ClassLabel feature")
            self.class_names = list(feature.names)
        encode = self._encode_sft if task == "sft" else self._encode_classify
        train, skipped = encode(read_examples(builder, data_cfg.train_split, self._keys(data_cfg)), data_cfg, seq_len)
        evals, eval_skipped = encode(read_examples(builder, data_cfg.eval_split, self._keys(data_cfg)), data_cfg, seq_len)
        self._test = None
        test_split = data_cfg.get("test_split")
        if test_split and test_split in builder.info.splits:  # reported only, never chosen on
            self._test = encode(read_examples(builder, test_split, self._keys(data_cfg)), data_cfg, seq_len)[0]
        if not len(evals["tokens"]):
            raise UserError(f"the evaluation split {data_cfg.eval_split!r} of {builder.info.full_name!r} has no usable "
                            "examples: widen data.include/data.exclude or use a longer data.seq_len")
        seconds = time.perf_counter() - start
        what = (f"prompts longer than {MAX_PROMPT_FRACTION:.0%} of the window skipped: {skipped:,} train, "
                f"{eval_skipped:,} eval" if task == "sft" else
                f"{len(self.class_names)} classes, eval counts " + ", ".join(
                    f"{name} {n}" for name, n in zip(self.class_names, np.bincount(evals["labels"],
                                                                                   minlength=len(self.class_names)))))
        log(f"data: {builder.info.full_name} ({data_cfg.train_split}: {len(train['tokens']):,} examples, "
            f"{data_cfg.eval_split}: {len(evals['tokens']):,} examples; {what}) prepared in {seconds:.1f}s")
        self.train = ExampleBatches(train, data_cfg.batch_size, seed, process_index, process_count)
        self._eval = (evals, data_cfg.batch_size, seed, process_index, process_count)

    def split_sizes(self) -> dict:
        """Usable examples per split (train, validation, test), after those that do not fit were dropped."""
        sizes = {"train": self.train.num_examples, "validation": len(self._eval[0]["tokens"])}
        if self._test is not None:
            sizes["test"] = len(self._test["tokens"])
        return sizes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_batches(self, num_batches: int) -> list:
        evals, batch_size, seed, *process = self._eval
        del seed  # the same evaluation examples for every run (see pipeline.EVAL_SEED)
        return fixed_batches(evals, batch_size, num_batches, pipeline.EVAL_SEED, *process)

    def test_batches(self, num_batches: int):
        """Fixed batches of the test split, selected as the evaluation batches are; None without one."""
        if self._test is None or not len(self._test["tokens"]):
            return None
        _, batch_size, _, *process = self._eval
        return fixed_batches(self._test, batch_size, num_batches, pipeline.EVAL_SEED, *process)

    def _keys(self, data_cfg):
        if self.task == "sft":
            return (data_cfg.prompt_key, data_cfg.response_key)
        return (data_cfg.text_key, data_cfg.label_key)

    def _encode_sft(self, examples, data_cfg, seq_len):
        return encode_sft_examples(self.tokenizer, examples, data_cfg, seq_len)

    def _encode_classify(self, examples, data_cfg, seq_len):
        return encode_classify_examples(self.tokenizer, examples, data_cfg, seq_len)


def encode_sft_examples(tokenizer, examples, data_cfg, seq_len: int) -> tuple:
    """(arrays tokens/weights, number skipped) for a list of sft examples (training and experiments.evaluate)."""
    encoded = [encode_sft(tokenizer, ex[data_cfg.prompt_key], ex[data_cfg.response_key], seq_len)
               for ex in examples]
    kept = [e for e in encoded if e is not None]
    arrays = {"tokens": np.array([t for t, _ in kept], np.int32).reshape(-1, seq_len + 1),
              "weights": np.array([w for _, w in kept], np.float32).reshape(-1, seq_len)}
    return arrays, len(encoded) - len(kept)


def encode_classify_examples(tokenizer, examples, data_cfg, seq_len: int) -> tuple:
    """(arrays tokens/lengths/labels/weights, 0) for a list of classify examples."""
    encoded = [encode_classify(tokenizer, ex[data_cfg.text_key], seq_len) for ex in examples]
    arrays = {"tokens": np.array([t for t, _ in encoded], np.int32).reshape(-1, seq_len),
              "lengths": np.array([n for _, n in encoded], np.int32),
              "labels": np.array([int(ex[data_cfg.label_key]) for ex in examples], np.int32),
              "weights": np.ones(len(examples), np.float32)}
    return arrays, 0
