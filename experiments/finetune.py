"""Fine-tunes a pretrained GPT; resumes automatically when the workdir has checkpoints.

    python -m experiments.finetune --config=configs/finetune.py:lora --workdir=/tmp/ft \
        --config.finetune.init_from=/tmp/run [--config.train.num_steps=500 ...]
"""
from absl import flags
from ml_collections import config_flags

from gptlab import cli, finetune

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.default_config("configs/finetune.py:lora"), "Experiment config file and preset, e.g. configs/finetune.py:head,classify.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.",
                               required=True)

if __name__ == "__main__":
    cli.run(lambda: finetune.finetune_and_evaluate(_CONFIG.value, _WORKDIR.value))
