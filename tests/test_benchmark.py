"""The benchmark runs the real train step and reports its numbers; never a speed threshold."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, needs
from gptlab import benchmark
from gptlab.errors import UserError

# Fields every run reports as positive, finite numbers.
POSITIVE = ("compile_s", "first_step_s", "step_time_median_s", "tokens_per_s", "model_tflops_per_s", "mfu",
            "peak_tflops", "pipeline_tokens_per_s", "pipeline_over_training", "flops_per_token")


def check_positive(result, keys):
    for key in keys:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, (key, result)


def check_spread(spread):
    assert 0 < spread["p10_s"] <= spread["p90_s"]


@pytest.mark.slow
def test_command_with_synthetic_data_and_torch_peer_prints_one_json_line(tmp_path):
    needs("torch", "bench")
    needs("transformers", "bench")
    data_dir = tmp_path / "tfds"  # --synthetic must leave it untouched
    cmd = [sys.executable, "-m", "experiments.benchmark", "--config=configs/pretrain.py:tiny",
           f"--config.data.data_dir={data_dir}", "--steps=2", "--warmup=1", "--synthetic", "--compare=torch"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    check_positive(result, POSITIVE)
    check_positive(result, ("torch_step_time_median_s", "torch_tokens_per_s", "ratio_vs_torch"))
    check_spread(result["step_time_spread"])
    check_spread(result["torch_step_time_spread"])
    assert result["data"] == "synthetic" and result["model"]["vocab_size"] == 257
    assert result["peak_memory_bytes"] is None or result["peak_memory_bytes"] > 0
    assert not data_dir.exists()


def test_real_pipeline(make_config):
    result = benchmark.run(make_config(), steps=2, warmup=1, log=lambda message: None)
    check_positive(result, POSITIVE)
    check_spread(result["step_time_spread"])
    assert result["data"] == "python_stdlib" and result["seq_len"] == 64 and "ratio_vs_torch" not in result
    json.dumps(result)  # the command prints it as JSON


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), "--steps=0 must be positive"),
    (dict(steps=1, compare="tf"), "--compare='tf'"),
])
def test_bad_arguments_are_user_errors(make_config, kwargs, message):
    with pytest.raises(UserError, match=message):
        benchmark.run(make_config(), **kwargs)


def test_synthetic_char_tokenizer_needs_a_vocab_size(make_config):
    with pytest.raises(UserError, match="set --config.model.vocab_size"):
        benchmark.run(make_config(data__tokenizer="char"), steps=1, synthetic=True)
