"""Evaluates a trained model: loss, perplexity and bits per byte; writes WORKDIR/eval.json.

    python -m experiments.evaluate --workdir=/tmp/run [--step=best] [--config.data.eval_split=test ...]

Works on any pretraining, fine-tuning or imported (experiments.convert) workdir;
unset `--config.data.*` fields are the run's own (see configs/evaluate.py).
"""
from ml_collections import config_flags

from gptlab import cli, evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.default_config("configs/evaluate.py"), "Evaluation config file; fields left unset are the run's own.",
    lock_config=True)
_WORKDIR, _STEP = cli.define_checkpoint_flags("evaluate")

if __name__ == "__main__":
    cli.run(lambda: evaluate.evaluate(_WORKDIR.value, _CONFIG.value, _STEP.value))
