"""Evaluates several workdirs on the same text and prints and writes one table.

    python -m experiments.compare --workdirs=/tmp/gptlab/pretrain,/tmp/gptlab/ft_lora \
        [--step=best] [--output=compare.md]

--workdirs may be repeated; a path that holds a comma is given as a --workdirs of its own.

The text (dataset, split, include/exclude, ...) is the same for every run: the
`--config.data.*` fields given, else the first workdir's. See gptlab/compare.py.
"""
from absl import flags
from ml_collections import config_flags

from gptlab import cli
from gptlab import compare

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/evaluate.py", "Evaluation config file; data fields left unset are the first run's.",
    lock_config=True)
_WORKDIRS = flags.DEFINE_multi_string("workdirs", None, "Workdirs to compare, separated by commas; repeat the flag "
                                      "to give a path holding a comma on its own (an existing path is never split).",
                                      required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the Markdown table here (and its rows as .json beside it).")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step of every workdir, or 'best' (by validation); default the latest.")


def main() -> None:
    table = compare.compare(compare.split_workdirs(_WORKDIRS.value), _CONFIG.value, _STEP.value)
    print(compare.markdown(table), end="")
    if _OUTPUT.value:
        markdown_path, json_path = compare.write(table, _OUTPUT.value)
        print(f"wrote {markdown_path} and {json_path}")


if __name__ == "__main__":
    cli.run(main)
