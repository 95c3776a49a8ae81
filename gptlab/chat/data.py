"""Batches for chat SFT (`finetune.task=chat`) and preference tuning (`finetune.task=dpo`).

Records come from `data.path` (a JSONL file, `gptlab.chat.formats`) or, when it is
unset, from the embedded data (`gptlab.chat.corpus`). With a file, validation and
test are the lines its stable hash (or a line's own "split") puts there, unless
`data.eval_path` / `data.test_path` name files of their own.

chat: each conversation renders with the chat template to `tokens` (seq_len + 1)
and `weights` (seq_len): 1 on the targets that are assistant text or an assistant
turn's closing <|end|>, so `steps.lm_loss_fn` learns only the assistant (eval_loss
is the assistant-token loss). A conversation longer than the window loses the start
of its prompt first (`template.keep_answer`: the first assistant turn starts inside
the window), then its end; it keeps the mask of what survives, and one with no
assistant token left in the window is skipped (counted in the log).

dpo: each pair renders twice, prompt + chosen and prompt + rejected, each with the
mask of its answer; `weights` (1 per pair) marks padding rows of evaluation batches.
The reference model's log-probabilities of both answers (`ref_chosen`,
`ref_rejected`) are computed once here, from the starting checkpoint, by the
caller's `reference` function (see gptlab/chat/dpo.py). A pair whose prompt leaves
no room for an answer token in the window is skipped.

Batching, order, resumption and the fixed evaluation selection are the
supervised tasks' (`gptlab.data.supervised`).
"""
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptlab import model as model_lib
from gptlab.chat import corpus, formats, template
from gptlab.chat.dpo import sequence_logps
from gptlab.data import pipeline, supervised
from gptlab.errors import UserError


def load_records(kind: str, data_cfg) -> dict:
    """{split: records} for kind "chat" or "dpo", from data.path (and eval_path/test_path) or the embedded data."""
    names = {"train": data_cfg.train_split, "validation": data_cfg.eval_split, "test": data_cfg.get("test_split")}
    path = data_cfg.get("path")
    if not path:
        build = corpus.conversations if kind == "chat" else corpus.preferences
        include, exclude = tuple(data_cfg.include), tuple(data_cfg.exclude)
        return ({split: build(split, include, exclude) for split in names if names[split]},
                "embedded chat data (held-out stdlib, gptlab/chat/corpus.py)")
    records = formats.read_jsonl(path, kind)
    out = {split: [r for r in records if r["split"] == split] for split in names}
    for split, key in (("validation", "eval_path"), ("test", "test_path")):
        if data_cfg.get(key):
            out[split] = formats.read_jsonl(data_cfg.get(key), kind)
            if split == "validation":  # lines given their own file are not taken from data.path's hash
                out["train"] += [r for r in records if r["split"] == "validation"]
            else:
                out["train"] += [r for r in records if r["split"] == "test"]
    if not out["validation"]:
        raise UserError(f"data.path={path} gives no validation conversations (its stable hash puts about 10% of "
                        "lines there): add lines, or pass --config.data.eval_path=FILE.jsonl")
    return out, str(path)


def encode_conversations(tokenizer, records: list, seq_len: int) -> tuple:
    """(arrays tokens/weights, number skipped for having no assistant token in the window)."""
    tokens, weights = [], []
    contents = tokenizer.encode_batch([m["content"] for r in records for m in r["messages"]])
    at = 0
    for r in records:
        n = len(r["messages"])
        ids, mask = template.render(tokenizer, r["messages"], contents[at:at + n])
        at += n
        t, w = template.to_example(*template.keep_answer(ids, mask, seq_len + 1), seq_len, tokenizer.eot_id)
        if w.any():
            tokens.append(t)
            weights.append(w)
    arrays = {"tokens": np.array(tokens, np.int32).reshape(-1, seq_len + 1),
              "weights": np.array(weights, np.float32).reshape(-1, seq_len)}
    return arrays, len(records) - len(tokens)


def encode_preferences(tokenizer, records: list, seq_len: int) -> tuple:
    """(arrays chosen_/rejected_ tokens and weights, weights (1 per pair), number skipped)."""
    out = {k: [] for k in ("chosen_tokens", "chosen_weights", "rejected_tokens", "rejected_weights")}
    for r in records:
        rendered = {}
        for side in ("chosen", "rejected"):
            messages = r["prompt"] + [{"role": "assistant", "content": r[side]}]
            ids, mask = template.keep_answer(*template.render(tokenizer, messages), seq_len + 1)
            rendered[side] = template.to_example(ids, mask, seq_len, tokenizer.eot_id)
        if all(w.any() for _, w in rendered.values()):
            for side, (t, w) in rendered.items():
                out[f"{side}_tokens"].append(t)
                out[f"{side}_weights"].append(w)
    arrays = {k: np.array(v, np.int32 if k.endswith("tokens") else np.float32).reshape(
        -1, seq_len + 1 if k.endswith("tokens") else seq_len) for k, v in out.items()}
    arrays["weights"] = np.ones(len(arrays["chosen_tokens"]), np.float32)
    return arrays, len(records) - len(arrays["weights"])


@functools.partial(jax.jit, static_argnames="cfg")
def _logps(params, tokens, weights, *, cfg):
    logits = model_lib.GPT(cfg).apply({"params": params}, tokens[:, :-1])
    return sequence_logps(logits, tokens[:, 1:], weights)[0]


def reference_logps(params, cfg: model_lib.GPTConfig, tokens, weights, batch_size: int = 32) -> np.ndarray:
    """The summed log-probabilities of the masked targets of each row under (params, cfg), in batches."""
    out = []
    for start in range(0, len(tokens), batch_size):
        t, w = tokens[start:start + batch_size], weights[start:start + batch_size]
        pad = batch_size - len(t)  # one compiled shape
        t, w = np.pad(t, ((0, pad), (0, 0))), np.pad(w, ((0, pad), (0, 0)))
        out.append(np.asarray(jax.device_get(_logps(params, jnp.asarray(t), jnp.asarray(w), cfg=cfg)))[:len(t) - pad])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class ChatData:
    """Train and evaluation batches for `kind` "chat" or "dpo"; `reference(tokens, weights) -> logps` for dpo."""

    def __init__(self, kind: str, data_cfg, seq_len: int, seed: int, tokenizer, process_index: int = 0,
                 process_count: int = 1, log: Callable = print, reference: Callable = None):
        start = time.perf_counter()
        self.tokenizer = tokenizer
        records, source = load_records(kind, data_cfg)
        fraction = data_cfg.get("train_fraction", 1.0)
        if not 0 < fraction <= 1:
            raise UserError(f"data.train_fraction={fraction} must be in (0, 1]: e.g. 0.1 trains on the first 10% "
                            "of the training conversations")
        if fraction < 1:  # the first share, in the file's (or the embedded data's) stable order
            records["train"] = records["train"][:max(1, math.ceil(fraction * len(records["train"])))]
        encoded, skipped = {}, {}
        for split, rows in records.items():
            if kind == "chat":
                encoded[split], skipped[split] = encode_conversations(tokenizer, rows, seq_len)
            else:
                encoded[split], skipped[split] = encode_preferences(tokenizer, rows, seq_len)
                if reference is not None:
                    for side in ("chosen", "rejected"):
                        encoded[split][f"ref_{side}"] = reference(
                            encoded[split][f"{side}_tokens"], encoded[split][f"{side}_weights"]).astype(np.float32)
        if not len(encoded["validation"]["weights"]):
            raise UserError(f"no validation {'conversation' if kind == 'chat' else 'pair'} of {source} has an "
                            f"assistant token within the window of {seq_len} tokens: use shorter prompts")
        what = "conversations" if kind == "chat" else "preference pairs"
        log(f"data: {source}, {what} " + ", ".join(
            f"{split} {len(a['weights']):,}" for split, a in encoded.items()) +
            f" (no assistant token within {seq_len} tokens, skipped: " +
            ", ".join(f"{split} {n:,}" for split, n in skipped.items()) +
            f") prepared in {time.perf_counter() - start:.1f}s")
        self.train = supervised.ExampleBatches(encoded["train"], data_cfg.batch_size, seed, process_index,
                                               process_count)
        self._splits = encoded
        self._eval = (data_cfg.batch_size, process_index, process_count)

    def split_sizes(self) -> dict:
        return {split: len(a["weights"]) for split, a in self._splits.items()}

    def eval_batches(self, num_batches: int) -> list:
        return supervised.fixed_batches(self._splits["validation"], self._eval[0], num_batches, pipeline.EVAL_SEED,
                                        *self._eval[1:])

    def test_batches(self, num_batches: int):
        test = self._splits.get("test")
        if test is None or not len(test["weights"]):
            return None
        return supervised.fixed_batches(test, self._eval[0], num_batches, pipeline.EVAL_SEED, *self._eval[1:])

    def split(self, name: str) -> dict:
        """The encoded arrays of one split (for evaluation outside training)."""
        return self._splits[name]
