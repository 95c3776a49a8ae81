"""Evaluates a trained model: loss, perplexity and bits per byte; writes WORKDIR/eval.json.

    python -m experiments.evaluate --workdir=/tmp/run [--step=best] [--config.data.eval_split=test ...]

Works on any pretraining, fine-tuning or imported (experiments.convert) workdir;
unset `--config.data.*` fields are the run's own (see configs/evaluate.py).
"""
from absl import flags
from ml_collections import config_flags

from gptlab import cli, evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.default_config("configs/evaluate.py"), "Evaluation config file; fields left unset are the run's own.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The workdir whose checkpoint to evaluate.", required=True)
_STEP = flags.DEFINE_string("step", None, "Checkpoint step to evaluate, or 'best' (by validation); default the latest.")

if __name__ == "__main__":
    cli.run(lambda: evaluate.evaluate(_WORKDIR.value, _CONFIG.value, _STEP.value))
