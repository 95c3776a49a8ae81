"""Writes a sweep's report from its stored results: DIR/report.md, DIR/report.tex, DIR/figures/*.png.

    python -m experiments.report --workdir=DIR

Works at any time, also while the sweep runs or after it failed: cells that have
not finished are reported as such, and the command then ends with a one-line error
(exit status 2) saying how many, so that scripts notice an incomplete report.
"""
from absl import flags

from gptlab import cli
from gptlab.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (holding sweep.json).", required=True)


def main() -> None:
    from gptlab import report

    written = report.write_report(_WORKDIR.value)
    states = written["states"]
    finished = sum(1 for s in states.values() if s["status"] == "finished")
    print(f"report of {finished}/{len(states)} finished cells: {written['markdown']}, {written['latex']}, "
          f"{len(written['figures'])} figures in {written['markdown'].parent / 'figures'}")
    unfinished = {name: s["status"] for name, s in states.items() if s["status"] != "finished"}
    if unfinished:
        kinds = sorted(set(unfinished.values()))
        counts = ", ".join(f"{list(unfinished.values()).count(k)} {k}" for k in kinds)
        raise UserError(f"{len(unfinished)} of {len(states)} cells have not finished ({counts}): the report covers "
                        f"the {finished} finished ones and marks the rest; finish the sweep (rerun its command) "
                        "and report again")


if __name__ == "__main__":
    cli.run(main)
