"""Chat SFT and DPO end to end from a tiny pretrained run, and the chat command in non-terminal mode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_finetune import ft_config, pretrained  # noqa: F401 (the shared tiny pretraining run, a fixture)
from gptlab import finetune, tokenizers
from gptlab.errors import UserError


def conversation(i: int) -> dict:
    messages = [{"role": "user", "content": f"add {i} and 1"}, {"role": "assistant", "content": str(i + 1)}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer with a number."})
    return {"messages": messages}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path




def chat_config(data_dir, init_from, preset, path, **overrides):
    config = ft_config(data_dir, init_from, preset, **overrides)
    config.data.path = str(path)
    return config


@pytest.fixture(scope="module")
def chat_run(pretrained, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_sft")
    path = write_jsonl(root / "chat.jsonl", [conversation(i) for i in range(120)])
    final = finetune.finetune_and_evaluate(chat_config(data_dir, pretrained, "full,chat,tiny", path), root / "run")
    return root / "run", final


def test_chat_sft_grows_the_vocabulary_and_records_it(chat_run):
    workdir, final = chat_run
    assert np.isfinite(final["eval_loss"]) and final["step"] == 4
    restore = json.loads((workdir / "restore.json").read_text())
    assert restore["grown"] == ["wte/embedding"]
    added = json.loads((workdir / "trainable.json").read_text())["added_tokens"]
    assert added["tokens"]["<|end|>"] == 260 and added["vocab_size"] == {"pretrained": 257, "now": 261}
    spec = json.loads((workdir / "tokenizer.json").read_text())
    assert spec["chat_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert tokenizers.from_json(spec).vocab_size == 261


def test_chat_command_answers_each_input_line_with_one_line(chat_run):
    workdir, _ = chat_run
    turns = ["add 3 and 1", "and 4?", "hello\\there", "one more"]
    env = {**os.environ, "GPTLAB_ALLOCATOR_RESTART": "0"}
    done = subprocess.run([sys.executable, "-m", "experiments.chat", f"--workdir={workdir}", "--max_new_tokens=8",
                           "--temperature=0"], input="\n".join(turns) + "\n", capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == len(turns), done.stdout
    assert "loaded step 4" in done.stderr


def test_chat_command_refuses_a_model_without_chat_tokens(pretrained):
    env = {**os.environ, "GPTLAB_ALLOCATOR_RESTART": "0"}
    done = subprocess.run([sys.executable, "-m", "experiments.chat", f"--workdir={pretrained}"], input="hi\n",
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 2 and "no chat tokens" in done.stderr.strip().splitlines()[-1]


def test_a_bad_line_stops_before_anything_is_trained(pretrained, data_dir, tmp_path):
    records = [conversation(i) for i in range(20)]
    records[7] = {"messages": [{"role": "user", "content": "question without an answer"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(UserError, match=rf"^{path}:8: the conversation has no assistant turn"):
        finetune.finetune_and_evaluate(chat_config(data_dir, pretrained, "full,chat,tiny", path), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


@pytest.mark.slow  # about a minute on 2 busy cores
def test_dpo_from_the_chat_run_with_lora_logs_preference_metrics(chat_run, data_dir, tmp_path):
    workdir, _ = chat_run
    pairs = [{"prompt": f"add {i} and 1", "chosen": str(i + 1), "rejected": str(i + 7)} for i in range(120)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    final = finetune.finetune_and_evaluate(chat_config(data_dir, workdir, "lora,dpo,tiny", path), tmp_path / "dpo")
    for key in ("eval_loss", "eval_accuracy", "eval_reward_margin", "eval_chosen_logp", "eval_rejected_logp",
                "train_reward_margin", "train_accuracy"):
        assert np.isfinite(final[key]), key
    start = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and abs(start["eval_loss"] - np.log(2)) < 1e-5  # policy == reference at the start
