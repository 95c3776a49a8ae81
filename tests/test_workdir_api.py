"""The notebook API: `gptlab.workdir.load` + `Run.generate`, on checkpoints written by one device or several."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, restore_state_numpy
from gptlab import sampling, train, workdir


def test_load_and_generate_match_the_sampler_and_repeat(make_config, tmp_path):
    train.train_and_evaluate(make_config(train__num_steps=4, train__eval_every=2), tmp_path)
    run = workdir.load(tmp_path, step="best")
    assert run.step in (0, 2, 4)
    latest = workdir.load(tmp_path)
    assert latest.step == 4
    text = latest.generate("def f(", max_new_tokens=12, temperature=0)
    # The same thing through the sampler directly: the prompt's tokens, greedy, decoded new tokens only.
    ids = latest.tokenizer.encode("def f(")
    [new] = sampling.generate(latest.params, latest.model_cfg, [ids], 12, temperature=0,
                              end_token=latest.tokenizer.eot_id)
    assert text == latest.tokenizer.decode([int(t) for t in new])
    assert latest.generate(["def f(", "x"], max_new_tokens=12, temperature=0)[0] == text
    assert latest.generate("x", max_new_tokens=8, seed=3) == latest.generate("x", max_new_tokens=8, seed=3)


@pytest.mark.slow
def test_a_checkpoint_written_over_two_devices_loads_in_a_one_device_process(data_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run([sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:tiny",
                    f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}", "--config.train.num_steps=2",
                    "--config.parallel.mesh=(1, 2)"],  # parameters sharded over the two devices (FSDP)
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    assert len(jax.devices()) == 1
    run = workdir.load(tmp_path)
    expected = restore_state_numpy(tmp_path, 2)["params"]
    for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert isinstance(run.generate("a", max_new_tokens=4, temperature=0), str)
