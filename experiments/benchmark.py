"""Times the real training step and prints one JSON line of results on stdout (the log goes to stderr).

    python -m experiments.benchmark --config=configs/pretrain.py:small --steps=20 [--warmup=3] \
        [--synthetic] [--compare=torch] [--config.model.n_layer=6 ...]

--synthetic feeds random tokens instead of the dataset (nothing is prepared);
--compare=torch also times transformers' GPT2LMHeadModel of the same shapes,
alternating blocks of steps with gptlab's (pip install -e ".[bench]").
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

from gptlab import benchmark, cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py:small", "Experiment config file and preset, e.g. configs/pretrain.py:tiny.",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (per framework).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the first (compiling) one.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Random tokens instead of the dataset; prepares nothing.")
_COMPARE = flags.DEFINE_enum("compare", "", list(benchmark.COMPARE), "Also time a peer: torch (transformers GPT-2).")
_BLOCKS = flags.DEFINE_integer("blocks", 4, "With --compare: the timed steps alternate in this many blocks each.")


def main():
    log = lambda message: print(message, file=sys.stderr, flush=True)
    result = benchmark.run(_CONFIG.value, _STEPS.value, _WARMUP.value, _SYNTHETIC.value, _COMPARE.value,
                           _BLOCKS.value, log=log)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
