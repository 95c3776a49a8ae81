"""Evaluation: deterministic loss, perplexity and bits per byte over every token of a split, in eval.json."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from conftest import REPO
from gptlab import convert, evaluate
from gptlab.data import pipeline
from gptlab.errors import UserError
from gptlab.model import GPT, init_params
from gptlab.tokenizers import ByteTokenizer, CharTokenizer
from configs import evaluate as evaluate_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A workdir holding a randomly initialised tiny byte-level model, in the pretraining layout."""
    from conftest import tiny_config

    config = json.loads(tiny_config(data_dir, model__vocab_size=257, data__seq_len=64).to_json_best_effort())
    cfg = convert.model_config(config)
    workdir = tmp_path_factory.mktemp("eval_run")
    convert.save_workdir(workdir, init_params(cfg, jax.random.key(0)), config, {"kind": "byte"}, source="test")
    return workdir


def eval_config(**fields):
    config = evaluate_config.get_config()
    for dotted, value in fields.items():
        node = config
        *groups, name = dotted.split("__")
        for group in groups:
            node = node[group]
        setattr(node, name, value)
    return config


def test_every_token_of_the_split_is_predicted_once_and_results_are_deterministic(run):
    quiet = lambda *_: None
    first = evaluate.evaluate(run, eval_config(), log=quiet)
    assert json.loads((run / "eval.json").read_text()) == first
    second = evaluate.evaluate(run, eval_config(), log=quiet)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}
    # The split as the training pipeline tokenises it: every token but the first is a target.
    loaded = convert.load_workdir(run)
    data_cfg = evaluate.data_config(loaded.config, eval_config().data)
    texts = list(pipeline.read_texts(pipeline.prepare(data_cfg), "validation", "text"))
    stream = pipeline.tokenize_documents(texts, ByteTokenizer())
    assert first["tokens"] == len(stream) - 1 and first["split"] == "validation" and first["step"] == 0
    # Byte-level: every token but end-of-text is one byte of the text.
    assert first["bytes"] == sum(len(t.encode("utf-8")) for t in texts) - 1  # the first byte is context only
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    assert first["bits_per_byte"] == pytest.approx(first["loss"] * first["tokens"] / first["bytes"] / math.log(2))


def test_loss_is_the_mean_cross_entropy_of_consecutive_windows(run):
    result = evaluate.evaluate(run, eval_config(num_batches=1, data__batch_size=2, data__seq_len=16),
                               log=lambda *_: None)
    loaded = convert.load_workdir(run)
    data_cfg = evaluate.data_config(loaded.config, eval_config().data)
    texts = pipeline.read_texts(pipeline.prepare(data_cfg), "validation", "text")
    stream = pipeline.tokenize_documents(texts, ByteTokenizer()).astype(np.int32)
    windows = np.stack([stream[0:17], stream[16:33]])  # two windows overlapping by one token
    logits = GPT(loaded.model_cfg).apply({"params": loaded.params}, windows[:, :-1])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    assert result["tokens"] == 32 and result["batches"] == 1
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_bytes_are_counted_from_the_text_for_any_tokenizer():
    texts = ["héllo wörld ☃", "abc"]
    tokenizer = CharTokenizer("".join(texts))
    tokens, num_bytes = evaluate.token_stream(texts, tokenizer)
    assert len(tokens) == len(num_bytes) == len(texts[0]) + len(texts[1]) + 2
    assert num_bytes.sum() == pytest.approx(sum(len(t.encode("utf-8")) for t in texts))
    assert num_bytes[len(texts[0])] == 0  # the end-of-text token stands for no text


def test_tasks_are_evaluated_by_their_registered_evaluator(run, monkeypatch, tmp_path):
    loaded = convert.load_workdir(run)
    config = dict(loaded.config, finetune={"task": "translate"})
    params = init_params(loaded.model_cfg, jax.random.key(0))
    convert.save_workdir(tmp_path / "translate", params, config, {"kind": "byte"}, source="test")
    with pytest.raises(UserError, match="'translate' run and this gptlab has no evaluator"):
        evaluate.evaluate(tmp_path / "translate", eval_config(), log=lambda *_: None)
    seen = {}

    def accuracy(loaded, data_cfg, config, log):
        seen.update(step=loaded.step, split=data_cfg.eval_split)
        return {"accuracy": 0.75}

    monkeypatch.setitem(evaluate.TASKS, "translate", accuracy)
    result = evaluate.evaluate(tmp_path / "translate", eval_config(data__eval_split="test"), log=lambda *_: None)
    assert seen == {"step": 0, "split": "test"} and result["accuracy"] == 0.75 and result["task"] == "translate"
    assert json.loads((tmp_path / "translate" / "eval.json").read_text())["accuracy"] == 0.75


def test_evaluate_entry_point_takes_data_overrides_and_refuses_a_workdir_without_checkpoint(run, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    evaluate_cli = lambda *args: subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO,
                                                capture_output=True, text=True, timeout=120, env=env)
    result = evaluate_cli(f"--workdir={run}", "--config.data.eval_split=test", "--config.num_batches=2",
                          "--config.data.batch_size=4")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval.json").read_text())
    assert written["split"] == "test" and written["step"] == 0 and written["batches"] == 2
    assert written["tokens"] == 2 * 4 * 64 and 0 < written["bits_per_byte"] < 10
    result = evaluate_cli(f"--workdir={tmp_path / 'nothing'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no checkpoint" in result.stderr.strip().splitlines()[-1]
