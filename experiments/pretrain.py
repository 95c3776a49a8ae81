"""Pretrains a GPT; resumes automatically when the workdir has checkpoints.

    python -m experiments.pretrain --config=configs/pretrain.py:small --workdir=/tmp/run \
        [--config.train.num_steps=1000 ...]
"""
from absl import flags
from ml_collections import config_flags

from gptlab import cli, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.default_config("configs/pretrain.py:small"), "Experiment config file and preset, e.g. configs/pretrain.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.",
                               required=True)

if __name__ == "__main__":
    cli.run(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value))
