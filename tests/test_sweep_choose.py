"""A dynamic sweep stage (`choose`): one seed over the learning-rate grid, the choice made on validation,
the other seeds at the chosen value only; resumable, the choice recomputed from the stored results.

The cells run in process with the experiment replaced by a stand-in that writes a result.json whose
validation loss is a known function of the learning rate, so the right choice is known and the tests
take seconds.
"""
import json
import math

import pytest

from gptlab import results, train
from gptlab import sweep as sweep_lib
from gptlab.errors import Preempted, UserError

RATES = [1e-3, 3e-3, 1e-2]


def spec(best_rate=None, choose=None, seeds=(0, 1, 2)):
    return dict(name="choose_test", metric="eval_loss", stages=[dict(
        name="scratch", experiment="pretrain", config="configs/pretrain.py:tiny",
        overrides={"train.num_steps": 4}, grid={"data.train_fraction": [0.5, 1.0], "optimizer.learning_rate": RATES},
        seeds=list(seeds), choose=choose or {"key": "optimizer.learning_rate", "on_seed": 0, "metric": "eval_loss"})])


def best_rate(fraction):  # the known optimum: 3e-3 at half the data, 1e-2 (the grid's edge) at all of it
    return 3e-3 if fraction == 0.5 else 1e-2


class StandIn:
    """train.train_and_evaluate's stand-in: a result.json of the cell's config; loss minimal at best_rate."""

    def __init__(self):
        self.ran, self.preempt, self.fail = [], None, None

    def __call__(self, config, workdir):
        lr, fraction, seed = config.optimizer.learning_rate, config.data.train_fraction, config.seed
        if self.preempt is not None and (seed, lr) == self.preempt:
            raise Preempted(2, workdir)
        if self.fail is not None and (seed, fraction) == self.fail:
            raise UserError("a stand-in failure")
        self.ran.append((fraction, lr, seed))
        loss = 2.0 + (math.log10(lr) - math.log10(best_rate(fraction))) ** 2 + 0.01 * seed
        stored = json.loads(config.to_json_best_effort())
        result = {"eval_loss": loss + 1.0, "selection": {"metric": "eval_loss", "validation": {"eval_loss": loss}},
                  "steps": 4, "config": stored, "config_fingerprint": results.config_fingerprint(stored),
                  "artefacts": []}
        (workdir / results.FILENAME).write_text(json.dumps(result))
        return {"step": 4}


@pytest.fixture
def stand_in(monkeypatch):
    fake = StandIn()
    monkeypatch.setattr(train, "train_and_evaluate", fake)
    return fake


def run(workdir, sweep):
    return sweep_lib.Runner(sweep, workdir, in_process=True, log=lambda message: None).run()


def test_the_choice_is_made_on_one_seed_and_the_other_seeds_run_only_at_it(stand_in, tmp_path):
    sweep = sweep_lib.expand(spec(), "test", {})
    states = run(tmp_path, sweep)
    # seed 0 over the whole grid, then seeds 1 and 2 at each fraction's chosen rate: 2 x 3 + 2 x 2 cells
    assert sorted(r for r in stand_in.ran if r[2] == 0) == sorted((f, lr, 0) for f in (0.5, 1.0) for lr in RATES)
    assert sorted(r for r in stand_in.ran if r[2] > 0) == [(0.5, 3e-3, 1), (0.5, 3e-3, 2), (1.0, 1e-2, 1),
                                                            (1.0, 1e-2, 2)]
    counts = sweep_lib.count_statuses(states)
    assert counts == {"finished": 10, "skipped": 8}
    choices = {c["group"].split('"data.train_fraction": ')[1][:3]: c
               for c in json.loads((tmp_path / "choices.json").read_text())["choices"]}
    assert choices["0.5"]["chosen"] == 3e-3 and not choices["0.5"]["at_edge"]
    assert choices["1.0"]["chosen"] == 1e-2 and choices["1.0"]["at_edge"]
    assert len(choices["0.5"]["scores"]) == 3 and choices["0.5"]["on_seed"] == 0
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    assert all(line["choice"]["chosen"] == (line["factors"]["optimizer.learning_rate"]
                                            == best_rate(line["factors"]["data.train_fraction"])) for line in lines)
    status = json.loads((tmp_path / "status.json").read_text())
    assert sorted(status["choices"].values()) == [3e-3, 1e-2]
    plan = {cell.name: state["status"] for cell, state in sweep_lib.Runner(sweep, tmp_path).plan()}
    assert sorted(plan.values()).count("skipped") == 8  # what --dry_run lists
    # A rerun runs nothing: the skipped cells stay skipped.
    stand_in.ran.clear()
    assert sweep_lib.count_statuses(run(tmp_path, sweep)) == {"finished": 10, "skipped": 8}
    assert stand_in.ran == []


def test_an_interrupted_choosing_sweep_resumes_and_recomputes_the_choice_from_the_results(stand_in, tmp_path):
    sweep = sweep_lib.expand(spec(), "test", {})
    stand_in.preempt = (1, 3e-3)  # the first cell of seed 1 (at half the data's chosen rate) is interrupted
    with pytest.raises(sweep_lib.SweepInterrupted):
        run(tmp_path, sweep)
    assert sorted(r for r in stand_in.ran if r[2] == 0) == sorted((f, lr, 0) for f in (0.5, 1.0) for lr in RATES)
    (tmp_path / "choices.json").unlink()  # the rerun recomputes the choice from the stored result.json files
    stand_in.ran.clear()
    stand_in.preempt = None
    states = run(tmp_path, sweep)
    assert all(r[2] > 0 for r in stand_in.ran)  # no seed-0 cell runs again
    assert sorted(stand_in.ran) == [(0.5, 3e-3, 1), (0.5, 3e-3, 2), (1.0, 1e-2, 1), (1.0, 1e-2, 2)]
    assert sweep_lib.count_statuses(states) == {"finished": 10, "skipped": 8}
    assert {c["chosen"] for c in json.loads((tmp_path / "choices.json").read_text())["choices"]} == {3e-3, 1e-2}


def test_a_choice_reads_accuracy_as_higher_is_better_and_bad_choose_specs_are_one_line_errors(tmp_path):
    sweep = sweep_lib.expand(spec(), "test", {})
    cell = sweep.cells[0]
    assert cell.choice["key"] == "optimizer.learning_rate" and not cell.waits_for_choice
    assert sweep.cells[-1].waits_for_choice
    # the choice does not enter the fingerprint: a stage that gains `choose` keeps its finished cells
    plain = dict(spec()["stages"][0])
    del plain["choose"]
    unchosen = sweep_lib.expand(dict(spec(), stages=[plain]), "test", {})
    assert [c.fingerprint for c in unchosen.cells] == [c.fingerprint for c in sweep.cells]
    for choose, words in [({"key": "model.n_embd"}, "is not one of the stage's grid fields"),
                          ({"key": "optimizer.learning_rate", "on_seed": 7}, "is not one of the stage's seeds"),
                          ({"key": "optimizer.learning_rate", "metric": "test_loss"}, "reads the test split"),
                          ({"key": "optimizer.learning_rate", "by": 1}, "unknown key 'by'")]:
        with pytest.raises(UserError, match=words):
            sweep_lib.expand(spec(choose=choose), "test", {})


def test_cells_waiting_for_a_choice_are_not_blocked_once_their_seed_0_cells_have_just_finished(tmp_path):
    # Cells run as processes: the last seed-0 cell is reaped after the scheduling pass, with nothing running
    # and only the cells waiting for the choice pending. They are startable (the next pass decides), not blocked.
    sweep = sweep_lib.expand(spec(), "test", {})
    runner = sweep_lib.Runner(sweep, tmp_path, log=lambda message: None)
    waiting = [c for c in sweep.cells if c.waits_for_choice]
    states = {c.name: {"status": "finished" if not c.waits_for_choice else "pending"} for c in sweep.cells}
    assert runner._startable(waiting, states, running=())
    seed0 = [c for c in sweep.cells if not c.waits_for_choice]
    assert runner._startable(waiting, {**states, seed0[0].name: {"status": "pending"}}, running=[seed0[0].name])
    # an on_seed cell neither finished nor to be run (e.g. foreign): nothing can start
    assert not runner._startable(waiting, {**states, **{c.name: {"status": "foreign"} for c in seed0}}, running=())


def test_when_every_seed_0_cell_of_a_group_fails_its_other_seeds_are_blocked_then_run_on_a_rerun(stand_in, tmp_path):
    sweep = sweep_lib.expand(spec(), "test", {})
    stand_in.fail = (0, 0.5)  # every seed-0 cell at half the data fails: nothing to choose on
    states = run(tmp_path, sweep)
    blocked = {n for n, s in states.items() if s["status"] == "blocked"}
    assert len(blocked) == 6 and all("train_fraction=0.5" in n and not n.endswith("seed0") for n in blocked)
    assert "to choose optimizer.learning_rate on" in states[sorted(blocked)[0]]["error"]
    stand_in.fail, stand_in.ran = None, []
    states = run(tmp_path, sweep)  # the failed cells are retried, then the blocked ones run at the choice
    assert sorted(stand_in.ran) == sorted([(0.5, lr, 0) for lr in RATES] + [(0.5, 3e-3, 1), (0.5, 3e-3, 2)])
    assert sweep_lib.count_statuses(states) == {"finished": 10, "skipped": 8}
