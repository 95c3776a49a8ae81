"""Evaluating a trained model on a split; the result is a file, WORKDIR/eval.json.

Deterministic: dropout off, and fixed batches. The split's documents are
tokenised in file order and joined with the end-of-text token into one stream,
which is cut into consecutive windows of seq_len + 1 tokens overlapping by one,
so every token after the first is predicted exactly once (unlike training's
shuffled windows). The last window and batch are padded with zero-weight
targets, so one compiled step serves every batch.

Language models report loss (mean next-token cross-entropy, nats), perplexity
and bits per byte: the summed loss in bits over the UTF-8 bytes of the text the
predicted tokens stand for, which compares models across tokenizers. Each
document's bytes are spread evenly over its tokens (end-of-text tokens count
none), so the byte count is exact over whole documents.

Tasks: a run's task comes from its config (`finetune.task`, default "lm"), and
`TASKS` maps it to an evaluator `fn(loaded, data_cfg, config, log) -> metrics`:
`lm` as above; `classify`: loss, accuracy, macro-F1 and the confusion matrix;
`sft`: loss on the response tokens, and from greedy generation the exact-match
rate of the response and the share of completions that parse as Python joined
to their prompt. Loss, accuracy and macro-F1 come from the same sums as the
training-time evaluation (`steps.metrics_from_sums`).
"""
import ast
import dataclasses
import json
import math
import time

import jax
import numpy as np
from ml_collections import config_dict

from gptlab import checkpoint as checkpoint_lib
from gptlab import convert, eval_scores
from gptlab import model as model_lib
from gptlab.data import pipeline
from gptlab import steps as steps_lib
from gptlab.errors import UserError


def token_stream(texts, tokenizer) -> tuple:
    """(tokens, bytes per token): documents joined by end-of-text, each document's bytes spread over its tokens."""
    tokens, num_bytes = [], []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        size = len(text.encode("utf-8", errors="surrogatepass"))
        tokens += [ids, np.array([tokenizer.eot_id], np.int32)]
        num_bytes += [np.full(len(ids), size / max(len(ids), 1)), np.zeros(1)]
    if not tokens:
        return np.zeros((0,), np.int32), np.zeros((0,))
    return np.concatenate(tokens), np.concatenate(num_bytes)


def windows(stream: np.ndarray, seq_len: int) -> tuple:
    """Consecutive (seq_len + 1)-token windows overlapping by one, and 0/1 weights of their targets."""
    num_windows = -(-(len(stream) - 1) // seq_len)
    padded = np.zeros(num_windows * seq_len + 1, stream.dtype)
    padded[:len(stream)] = stream
    starts = np.arange(num_windows)[:, None] * seq_len
    target_index = starts + np.arange(1, seq_len + 1)  # position in the stream of each target
    return padded[starts + np.arange(seq_len + 1)], (target_index < len(stream)).astype(np.float32), target_index


def lm_metrics(loaded, data_cfg, config, log=print) -> dict:
    """Loss, perplexity and bits per byte of a language model on `data_cfg.eval_split`."""

    cfg = loaded.model_cfg
    expected = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    checkpoint_lib.check_same_shapes(loaded.params, expected, where=f"checkpoint {loaded.directory}")
    if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        cfg = dataclasses.replace(cfg, attention="xla")  # cuDNN attention exists on NVIDIA GPUs only
    seq_len, batch_size = data_cfg.seq_len, data_cfg.batch_size
    if not 1 <= seq_len <= cfg.block_size:
        raise UserError(f"data.seq_len={seq_len} must be between 1 and the model's context {cfg.block_size}")
    if batch_size < 1:
        raise UserError(f"data.batch_size={batch_size} must be positive")
    tokenizer = loaded.tokenizer
    builder = pipeline.prepare(data_cfg)
    stream, token_bytes = token_stream(
        pipeline.read_texts(builder, data_cfg.eval_split, data_cfg.text_key), tokenizer)
    if len(stream) < 2:
        raise UserError(f"split {data_cfg.eval_split!r} of {data_cfg.dataset!r} has no text to evaluate on: "
                        "choose another --config.data.eval_split or dataset")
    tokens, weights, target_index = windows(stream, seq_len)
    num_batches = -(-len(tokens) // batch_size)
    if config.num_batches is not None:
        if config.num_batches < 1:
            raise UserError(f"num_batches={config.num_batches} must be positive (or unset: the whole split)")
        num_batches = min(num_batches, config.num_batches)
    eval_step = jax.jit(steps_lib.make_eval_step(steps_lib.lm_loss_fn(model_lib.GPT(cfg))))
    loss_sum = count = num_bytes = 0.0
    for b in range(num_batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        batch_tokens = np.zeros((batch_size, seq_len + 1), np.int32)
        batch_weights = np.zeros((batch_size, seq_len), np.float32)
        n = len(tokens[rows])
        batch_tokens[:n], batch_weights[:n] = tokens[rows], weights[rows]
        sums = jax.device_get(eval_step(loaded.params, {"tokens": batch_tokens, "weights": batch_weights}))
        loss_sum += float(sums["loss_sum"])
        count += float(sums["count"])
        covered = target_index[rows][weights[rows] > 0]
        num_bytes += float(token_bytes[covered].sum())
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss_sum / math.log(2) / num_bytes,
            "tokens": int(count), "bytes": int(round(num_bytes)), "batches": num_batches,
            "seq_len": seq_len, "batch_size": batch_size}


def _model_cfg(loaded) -> model_lib.GPTConfig:
    cfg = loaded.model_cfg
    if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        cfg = dataclasses.replace(cfg, attention="xla")  # cuDNN attention exists on NVIDIA GPUs only
    return cfg


def _examples(data_cfg, keys, seq_len, batch_size):
    from gptlab.data import supervised

    if not 1 <= seq_len:
        raise UserError(f"data.seq_len={seq_len} must be positive")
    if batch_size < 1:
        raise UserError(f"data.batch_size={batch_size} must be positive")
    builder = pipeline.prepare(data_cfg)
    return builder, supervised.read_examples(builder, data_cfg.eval_split, keys)


def _all_batches(arrays, batch_size, config) -> list:
    """Every example once (or the first config.num_batches batches), padding rows weighted 0."""
    from gptlab.data import supervised

    num = -(-len(arrays["tokens"]) // batch_size)
    if config.num_batches is not None:
        if config.num_batches < 1:
            raise UserError(f"num_batches={config.num_batches} must be positive (or unset: the whole split)")
        num = min(num, config.num_batches)
    return supervised.fixed_batches(arrays, batch_size, num, pipeline.EVAL_SEED)


def classify_metrics(loaded, data_cfg, config, log=print) -> dict:
    """Loss, accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted)."""
    from gptlab.data import supervised

    cfg = _model_cfg(loaded)
    builder, examples = _examples(data_cfg, (data_cfg.text_key, data_cfg.label_key), data_cfg.seq_len,
                                  data_cfg.batch_size)
    names = list(builder.info.features[data_cfg.label_key].names)
    arrays, _ = supervised.encode_classify_examples(loaded.tokenizer, examples, data_cfg, data_cfg.seq_len)
    batches = _all_batches(arrays, data_cfg.batch_size, config)
    eval_step = jax.jit(steps_lib.make_eval_step(steps_lib.classify_loss_fn(model_lib.GPT(cfg))))
    totals = steps_lib.sum_batches(eval_step, loaded.params, batches)
    metrics = {k[len("eval_"):]: v for k, v in steps_lib.metrics_from_sums(totals).items() if k != "eval_perplexity"}
    return {**metrics, "examples": int(totals["count"]), "classes": names,
            "confusion_matrix": np.asarray(totals["confusion"]).round().astype(int).tolist()}


def parses_as_python(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def sft_metrics(loaded, data_cfg, config, log=print) -> dict:
    """Loss on response tokens; greedy generation: exact match of the response, and the share of
    completions that parse as Python when joined to their prompt (`ast.parse`)."""
    from gptlab import sampling
    from gptlab.data import supervised

    cfg, tokenizer, seq_len = _model_cfg(loaded), loaded.tokenizer, data_cfg.seq_len
    keys = (data_cfg.prompt_key, data_cfg.response_key)
    _, examples = _examples(data_cfg, keys, seq_len, data_cfg.batch_size)
    arrays, skipped = supervised.encode_sft_examples(tokenizer, examples, data_cfg, seq_len)
    batches = _all_batches(arrays, data_cfg.batch_size, config)
    eval_step = jax.jit(steps_lib.make_eval_step(steps_lib.lm_loss_fn(model_lib.GPT(cfg))))
    totals = steps_lib.sum_batches(eval_step, loaded.params, batches)
    metrics = {k[len("eval_"):]: v for k, v in steps_lib.metrics_from_sums(totals).items()}
    kept = [ex for ex in examples if supervised.encode_sft(tokenizer, ex[keys[0]], ex[keys[1]], seq_len) is not None]
    if config.num_batches is not None:
        kept = kept[:config.num_batches * data_cfg.batch_size]
    exact = parsed = 0
    for start in range(0, len(kept), data_cfg.batch_size):  # greedy: the same completions every time
        chunk = kept[start:start + data_cfg.batch_size]
        prompts = [tokenizer.encode(ex[keys[0]]) for ex in chunk]
        budget = max(1, cfg.block_size - max(len(p) for p in prompts))
        outputs = sampling.generate(loaded.params, cfg, prompts, budget, temperature=0.0, end_token=tokenizer.eot_id)
        for ex, new in zip(chunk, outputs):
            completion = tokenizer.decode(list(new))
            exact += completion.rstrip() == ex[keys[1]].rstrip()
            parsed += parses_as_python(ex[keys[0]] + completion)
    log(f"sft: {len(kept)} examples generated greedily ({skipped} with prompts too long for the window skipped)")
    return {**metrics, "exact_match": exact / max(len(kept), 1), "parse_rate": parsed / max(len(kept), 1),
            "response_tokens": int(totals["count"]), "examples": len(kept)}


# task name -> evaluator(loaded, data_cfg, config, log) -> dict of metrics
TASKS = {"lm": lm_metrics, "classify": classify_metrics, "sft": sft_metrics}


def task_of(run_config: dict) -> str:
    return (run_config.get("finetune") or {}).get("task") or "lm"


def data_config(run_config: dict, overrides) -> config_dict.ConfigDict:
    """The run's data config with the fields set in `overrides` (configs/evaluate.py's data group) replaced."""
    data = config_dict.ConfigDict(run_config["data"])
    with data.unlocked():
        for key, value in overrides.items():
            if value is not None:
                data[key] = tuple(value) if isinstance(value, list) else value
        for key in ("include", "exclude"):
            data[key] = tuple(data.get(key) or ())
    return data


def evaluate(workdir, config, step=None, log=print) -> dict:
    """Evaluates the model of `workdir` as `config` (configs/evaluate.py) says; writes WORKDIR/eval.json."""
    start = time.perf_counter()
    loaded = convert.load_workdir(workdir, step, strict=False)
    task = task_of(loaded.config)
    if task not in TASKS:
        raise UserError(f"{workdir} is a {task!r} run and this gptlab has no evaluator for that task: "
                        f"it evaluates {sorted(TASKS)}")
    data_cfg = data_config(loaded.config, config.data)
    log(f"evaluating {loaded.directory} (step {loaded.step}, task {task}) on {data_cfg.dataset}/"
        f"{data_cfg.eval_split}")
    metrics = TASKS[task](loaded, data_cfg, config, log)
    result = {"workdir": str(loaded.directory.parents[1]), "step": loaded.step, "task": task,
              "dataset": data_cfg.dataset, "split": data_cfg.eval_split, **metrics,
              "seconds": round(time.perf_counter() - start, 2),
              # lm-eval and HumanEval scores, when experiments.lm_eval / experiments.humaneval ran on this workdir
              **eval_scores.read(loaded.directory.parents[1])}
    path = loaded.directory.parents[1] / "eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                   if not isinstance(v, list)))
    log(f"wrote {path}")
    return result
