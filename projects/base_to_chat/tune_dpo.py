"""DPO's beta, learning rate and steps for a preset, chosen on the VALIDATION pairs (never test).

    python -m projects.base_to_chat.tune_dpo --workdir=DIR [--preset=cpu] [--out=docs/results/chat]

DIR is the study's workdir once its SFT seed 0 has finished (`python -m experiments.study
--config=projects/base_to_chat/config.py:cpu --workdir=DIR --only=sft-seed0`). Each candidate of GRID
fine-tunes DIR/runs/sft-seed0 with the preset's DPO stage (seed 0) into DIR/tune_dpo/NAME/, two at a
time; each is measured by card.py's preference accuracy on the first `pairs` validation pairs (and
the SFT model itself); the table goes to OUT/dpo_tuning.csv and .json. The best candidate's values
are then written into config.py's preset by hand (the choice is the table's, not automatic).
"""
import json
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from gptlab import files, tables
from gptlab import sweep as sweep_lib
from gptlab.sweep import spec

_WORKDIR = flags.DEFINE_string("workdir", None, "The study's workdir (its runs/sft-seed0 finished).", required=True)
_PRESET = flags.DEFINE_string("preset", "cpu", "The preset of projects/base_to_chat/config.py.")
_OUT = flags.DEFINE_string("out", None, "Where dpo_tuning.csv / .json go (default DIR/tune_dpo).")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Candidates trained at once.")

# (beta, learning rate, steps)
GRID = [(0.1, 5e-5, 100), (0.1, 2e-4, 100), (0.5, 2e-4, 100), (0.1, 5e-4, 100)]


def main(_):
    from projects.base_to_chat import card

    workdir = pathlib.Path(_WORKDIR.value).absolute()
    sweep = sweep_lib.load_sweep(f"projects/base_to_chat/config.py:{_PRESET.value}")
    dpo = sweep.cell("dpo-seed0")
    sft = sweep_lib.run_dir(workdir, "sft-seed0")
    out_dir = pathlib.Path(_OUT.value or workdir / "tune_dpo")
    out_dir.mkdir(parents=True, exist_ok=True)
    pending, rows = [], []
    for beta, lr, steps in GRID:
        name = f"beta{beta}_lr{lr:g}_steps{steps}"
        run = workdir / "tune_dpo" / name
        overrides = {**dpo.overrides, "finetune.dpo_beta": beta, "optimizer.learning_rate": lr,
                     "optimizer.min_learning_rate": lr / 10, "train.num_steps": steps,
                     "optimizer.decay_steps": steps, "train.checkpoint_every": steps}
        command = [sys.executable, "-m", "experiments.finetune", f"--config={spec.resolve_path('configs/finetune.py')}:full,dpo",
                   f"--workdir={run}", f"--config.finetune.init_from={sft}", "--config.seed=0"]
        command += [f"--config.{k}={spec.render(v)}" for k, v in overrides.items()]
        pending.append((name, (beta, lr, steps), run, command))
    running = []
    while pending or running:
        while pending and len(running) < _PARALLEL.value:
            name, values, run, command = pending.pop(0)
            if (run / "result.json").exists():
                rows.append((name, values, run))
                continue
            run.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.parent / f"{name}.log", "w")
            running.append((name, values, run, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        for item in list(running):
            if item[3].poll() is not None:
                running.remove(item)
                if item[3].returncode != 0:
                    raise SystemExit(f"{item[0]} failed: see {item[2].parent / (item[0] + '.log')}")
                rows.append(item[:3])
        if running:
            time.sleep(2)
    settings = dict(sweep.study["card"])
    pairs = card.test_pairs(settings["pairs"], split="validation")
    measured = [{"name": "SFT (seed 0, no DPO)", "beta": None, "learning_rate": None, "steps": 0,
                 **card.preference_accuracy(card.load(sft), pairs)}]
    for name, (beta, lr, steps), run in sorted(rows):
        measured.append({"name": name, "beta": beta, "learning_rate": lr, "steps": steps,
                         **card.preference_accuracy(card.load(run), pairs)})
    files.write_json_atomic(out_dir / "dpo_tuning.json", measured)
    header = ["candidate", "beta", "learning rate", "steps", "validation preference accuracy", "validation pairs"]
    body = [[m["name"], m["beta"], m["learning_rate"], m["steps"], f"{m['preference_accuracy']:.3f}", m["pairs"]]
            for m in measured]
    tables.write_csv(out_dir / "dpo_tuning.csv", header, body)
    print("\n".join(tables.markdown(header, body)))


if __name__ == "__main__":
    app.run(main)
