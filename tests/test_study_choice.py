"""The study's report reads the sweep's learning-rate choice (made on seed 0's validation; gptlab/sweep `choose`)
instead of re-choosing over rates that ran different seeds, and does not count the cells the choice skipped as
missing."""
import json

from projects.pretrain_vs_finetune import report as study_lib
from tests.test_study_breadth import _cell, _spec

RATES = (1e-3, 3e-3, 9e-3)


def _records(recorded: bool) -> list:
    """One size, fraction 1: seed 0 over the grid, seeds 1 and 2 only at 3e-3, which seed 0 chose (validation 1.50
    against 1.55 at 9e-3). Averaged over their seeds, 3e-3 (1.573) loses to 9e-3 (1.55, one seed)."""
    records = []
    for stage in ("scratch_s1", "full_s1"):
        for lr, val in zip(RATES, (2.0, 1.50, 1.55)):
            records.append(_cell(stage, 0, val + 0.1, val=val, lr=lr, fraction=1.0))
        records += [_cell(stage, seed, 1.7, val=val, lr=3e-3, fraction=1.0) for seed, val in ((1, 1.60), (2, 1.62))]
    if recorded:
        for r in records:
            chosen = r["factors"]["optimizer.learning_rate"] == 3e-3
            r["choice"] = {"key": "optimizer.learning_rate", "group": r["stage"], "on_seed": 0, "chosen": chosen,
                           "at_edge": False}
    return records


def _load(tmp_path, records, **meta):
    directory = tmp_path / "study"
    directory.mkdir(parents=True)
    (directory / study_lib.RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / study_lib.SPEC).write_text(json.dumps({
        "name": "synthetic", "description": "synthetic", "source": "projects/pretrain_vs_finetune/config.py:small",
        "study": {**_spec({"s1": 1e4}), "fractions": [1.0], "seeds": [0, 1, 2]}, "runs": [], **meta}))
    return study_lib.load(directory)


def test_the_sweeps_choice_on_seed_0_stands_with_every_seed_of_the_chosen_rate(tmp_path):
    study = _load(tmp_path, _records(recorded=True), cells_in_sweep=10, cells_skipped=4)
    for *_, choice in study.efficiency():
        assert choice.learning_rate == 3e-3 and choice.on_seed == 0
        assert [c["seed"] for c in choice.cells] == [0, 1, 2] and choice.grid == RATES and not choice.at_edge
    efficiency = study.tables()["efficiency"][1]
    assert {row[6] for row in efficiency if row[2] in ("scratch", "fine-tuned")} == {"3"}  # seeds
    assert any("chosen by the sweep on seed 0's validation" in c and "0 of 2 choices are at an edge" in c
               for c in study.caveats())
    # skipped cells are neither missing nor run: the header says how many the choice skipped
    assert "10 of 10 cells (4 more skipped" in study.markdown([])
    # Without a recorded choice (older results): the best mean over each rate's seeds, as before.
    old = _load(tmp_path / "old", _records(recorded=False))
    for *_, choice in old.efficiency():
        assert choice.learning_rate == 9e-3 and choice.on_seed is None and len(choice.cells) == 1
    assert "skipped" not in old.markdown([]).split("\n")[4]


def test_a_chosen_rate_at_the_grids_edge_is_flagged(tmp_path):
    records = _records(recorded=True)
    for r in records:  # seed 0 chose 9e-3, the top of the grid; the other seeds ran there
        r["choice"]["chosen"] = r["factors"]["optimizer.learning_rate"] == (9e-3 if r["seed"] == 0 else 3e-3)
        r["choice"]["at_edge"] = True
    study = _load(tmp_path, [r for r in records if r["seed"] == 0])
    for *_, choice in study.efficiency():
        assert choice.learning_rate == 9e-3 and choice.at_edge and choice.lr_text.endswith("(edge)")
    assert any("2 of 2 choices are at an edge of their grid (marked (edge))" in c for c in study.caveats())
