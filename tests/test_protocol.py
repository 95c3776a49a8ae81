"""The study protocol: held-out data, early stopping and the best checkpoint, task metrics, selection on validation."""
import json
import pathlib
import sysconfig

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from conftest import restore_state_numpy, tiny_config
from gptlab import checkpoint as checkpoint_lib
from gptlab import evaluate, finetune, report, selection, sweep, train
from gptlab import steps as steps_lib
from gptlab.data import corpora, held_out, task_corpora
from gptlab.errors import UserError
from gptlab.metrics import read_metrics

PRESETS = ("tiny", "small", "gpt2_124m", "shakespeare_char", "shakespeare_char_cpu")


def stdlib_files() -> list:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [p.relative_to(root).as_posix() for p in corpora.PythonStdlib._candidate_files(None, root)]  # pylint: disable=protected-access


def files_read(data, files) -> set:
    """Relative paths of the standard library that a data config draws from (any split)."""
    if not data.dataset.startswith("python_stdlib"):
        return set()
    packages = data.get("packages") if data.dataset == "python_stdlib_packages" else None
    return {f for f in files if corpora.selected(f, tuple(data.include), tuple(data.exclude))
            and (packages is None or f.split("/")[0] in packages)}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", finetune_config.TASKS)
def test_pretraining_never_reads_a_file_any_task_draws_from(preset, task):
    files = stdlib_files()
    pretraining = files_read(pretrain_config.get_config(preset).data, files)
    task_files = files_read(finetune_config.get_config(f"full,{task}").data, files)
    assert task_files, f"task {task} draws from no file"
    assert all(held_out.is_held_out(f) for f in task_files)
    assert not pretraining & task_files, sorted(pretraining & task_files)[:5]
    if preset in ("small", "gpt2_124m"):  # the broad presets (tiny reads a-c only)
        assert len(pretraining) > 3 * len(task_files)  # pretraining stays broad


@pytest.mark.parametrize("preset", ["small", "gpu", "tiny"])
def test_the_studys_pretraining_never_reads_a_file_its_narrow_cells_draw_from(preset):
    files = stdlib_files()
    study = sweep.load_sweep(f"projects/pretrain_vs_finetune/config.py:{preset}")
    read = {"pretrain": set(), "narrow": set()}
    for cell in {c.stage: c for c in study.cells}.values():  # one cell per stage: a stage's cells share their data
        data = sweep.build_config(cell, init_from="<checked>" if cell.depends_on else None).data
        read["pretrain" if cell.stage.startswith("pretrain_") else "narrow"] |= files_read(data, files)
    assert read["narrow"] and all(held_out.is_held_out(f) for f in read["narrow"])
    assert read["pretrain"] and not read["pretrain"] & read["narrow"], sorted(read["pretrain"] & read["narrow"])[:5]


def test_block_split_keeps_nested_functions_with_their_block():
    source = "import os\n\n\nclass A:\n    def f(self):\n        def g():\n            return 1\n        return g\n\n" \
             "@decorator\ndef h():\n    pass\nX = 1\nY = 2\n"
    starts = task_corpora.top_level_blocks(source)
    assert starts == [1, 4, 10, 13]  # module head, class A, decorated h, the run of assignments
    assert task_corpora.block_of(starts, 6) == task_corpora.block_of(starts, 5) == 4
    splits = {task_corpora.split_of_block(f"p{i}.py", 1) for i in range(200)}
    assert splits == {"train", "validation", "test"}


def test_early_stopping_stops_at_the_expected_evaluation():
    stopping = selection.EarlyStopping("eval_loss", patience=2)
    sequence = [(10, 3.0), (20, 2.5), (30, 2.6), (40, 2.4), (50, 2.45), (60, 2.41), (70, 2.0)]
    stopped_at = None
    for step, value in sequence:
        stopping.update(step, {"eval_loss": value})
        if stopping.stopped:
            stopped_at = step
            break
    assert (stopped_at, stopping.best_step, stopping.best_value) == (60, 40, 2.4)
    higher = selection.EarlyStopping("eval_accuracy", patience=1)
    assert higher.update(1, {"eval_accuracy": 0.5}) and not higher.update(2, {"eval_accuracy": 0.4})
    assert higher.stopped and higher.best_step == 1


CRAFTED = {3: 5.0, 6: 4.0, 9: 4.5, 12: 4.6, 15: 4.7, 18: 4.8}  # best at 6; patience 3 stops at 15


@pytest.fixture
def crafted_eval(monkeypatch):
    """Training-time evaluation returns CRAFTED[step]; the step comes from the parameters' update count."""
    real = steps_lib.evaluate
    calls = []

    def fake(eval_step, params, batches, prefix="eval"):
        metrics = real(eval_step, params, batches, prefix)
        if prefix == "eval":
            calls.append(None)
            metrics["eval_loss"] = CRAFTED[3 * len(calls) + fake.offset]
        return metrics

    fake.offset = 0
    monkeypatch.setattr(steps_lib, "evaluate", fake)
    return fake, calls


def es_config(make_config, num_steps, **extra):
    return make_config(train__num_steps=num_steps, train__eval_every=3, train__checkpoint_every=3, train__log_every=1,
                       train__early_stopping_patience=3, optimizer__decay_steps=18, checkpoint__max_to_keep=1,
                       train__eval_batches=1, **extra)


def test_best_checkpoint_survives_rotation_and_result_records_it(make_config, tmp_path, crafted_eval):
    final = train.train_and_evaluate(es_config(make_config, 18), tmp_path)
    record = final["selection"]
    assert record["stopped_early"] and record["last_step"] == 15 and record["best_step"] == 6
    assert record["validation"]["eval_loss"] == 4.0 and set(record["test"]) >= {"test_loss", "test_perplexity"}
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 15]  # max_to_keep=1 keeps the latest, Orbax's BestN keeps the best
    assert checkpoint_lib.best_step(tmp_path / "checkpoints") == 6
    stored = json.loads((tmp_path / "result.json").read_text())["selection"]
    assert stored["best_step"] == 6 and stored["test"] == record["test"]
    # A rerun of the stopped run trains no further.
    assert train.train_and_evaluate(es_config(make_config, 18), tmp_path)["selection"]["last_step"] == 15


@pytest.mark.slow
def test_resume_with_early_stopping_is_bit_identical(make_config, tmp_path, crafted_eval):
    fake, calls = crafted_eval
    train.train_and_evaluate(es_config(make_config, 18), tmp_path / "straight")
    calls.clear()
    train.train_and_evaluate(es_config(make_config, 9), tmp_path / "resumed")  # "interrupted" at step 9 (same schedule)
    fake.offset = 9  # the resumed process's evaluations start after step 9
    calls.clear()
    final = train.train_and_evaluate(es_config(make_config, 18), tmp_path / "resumed")
    assert final["selection"]["last_step"] == 15 and final["selection"]["best_step"] == 6  # patience restored
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight]
    for a, b in zip(straight, resumed):
        assert a.get("train_loss") == b.get("train_loss") and a.get("eval_loss") == b.get("eval_loss"), (a, b)
    for a, b in zip(jax.tree.leaves(restore_state_numpy(tmp_path / "straight", 15)),
                    jax.tree.leaves(restore_state_numpy(tmp_path / "resumed", 15))):
        np.testing.assert_array_equal(a, b)


def test_bad_selection_settings_are_refused_before_anything_is_written(make_config, tmp_path):
    cases = [(dict(train__early_stopping_patience=-1), "must be >= 0"),
             (dict(train__selection_metric="eval_accuracy"), "not produced by task 'lm'"),
             (dict(train__early_stopping_patience=2, train__eval_every=40), "needs evaluations before the end"),
             (dict(data__test_split="validation"), "also data.eval_split")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train.train_and_evaluate(make_config(**overrides), tmp_path / "run")
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # `best` on a run without evaluations saved yet
    train.train_and_evaluate(make_config(train__num_steps=2, train__eval_every=2, train__checkpoint_every=1),
                             tmp_path / "ok")
    with pytest.raises(UserError, match="neither a step number nor 'best'"):
        checkpoint_lib.resolve_step(tmp_path / "ok" / "checkpoints", "bestest", "x")
    assert checkpoint_lib.resolve_step(tmp_path / "ok" / "checkpoints", "best", "x") == 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("pretrained")
    train.train_and_evaluate(tiny_config(data_dir, train__num_steps=4, train__checkpoint_every=4,
                                         train__eval_every=4, train__eval_batches=1), workdir)
    return workdir


def finetuned(data_dir, pretrained, task, workdir, **overrides):
    config = finetune_config.get_config(f"full,{task},tiny")
    config.data.data_dir, config.checkpoint.async_save = data_dir, False
    config.finetune.init_from = str(pretrained / "best")  # init_from accepts `best`
    config.train.num_steps, config.train.eval_every, config.train.checkpoint_every = 4, 2, 2
    config.train.eval_batches = 1
    for dotted, value in overrides.items():
        group, field = dotted.split("__")
        setattr(config[group], field, value)
    return finetune.finetune_and_evaluate(config, workdir)


def test_evaluate_reports_accuracy_f1_and_confusion_for_classify(pretrained, data_dir, tmp_path):
    final = finetuned(data_dir, pretrained, "classify", tmp_path)
    assert {"eval_accuracy", "eval_macro_f1"} <= set(final["selection"]["validation"])
    assert {"test_accuracy", "test_macro_f1"} <= set(final["selection"]["test"])
    config = evaluate_config.get_config()
    config.num_batches = 2
    result = evaluate.evaluate(tmp_path, config, step="best")
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (8, 8) and matrix.sum() == result["examples"] == 16
    assert result["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert result["macro_f1"] == pytest.approx(steps_lib.macro_f1(matrix))
    assert json.loads((tmp_path / "eval.json").read_text())["task"] == "classify"


def test_evaluate_reports_exact_match_and_parse_rate_for_sft(pretrained, data_dir, tmp_path):
    finetuned(data_dir, pretrained, "sft", tmp_path)
    config = evaluate_config.get_config()
    config.num_batches = 1
    result = evaluate.evaluate(tmp_path, config)
    assert result["examples"] >= 1
    assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["parse_rate"] <= 1.0
    assert result["loss"] > 0 and result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert evaluate.parses_as_python("def f():\n    '''x'''\n" + "    return 1\n")
    assert not evaluate.parses_as_python("def f():\n    '''x'''\n" + "    return (\n")


def test_macro_f1_against_hand_computed_values():
    confusion = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])  # class 2 never true, never predicted: left out
    assert steps_lib.macro_f1(confusion) == pytest.approx((6 / 8 + 4 / 6) / 2)
    confusion[1, 2] = 2  # predicted but never true: F1 0, counted
    assert steps_lib.macro_f1(confusion) == pytest.approx((6 / 8 + 4 / 8 + 0) / 3)


def result(val, test, lr):
    return {"selection": {"validation": {"eval_loss": val}, "test": {"test_loss": test}, "best_step": 10},
            "config": {"optimizer": {"learning_rate": lr}}}


def test_report_selects_on_validation_never_on_test():
    # Validation prefers lr 1e-3; test would prefer 3e-3: the report must pick 1e-3 and show its test loss.
    candidates = {"1e-3": [result(2.0, 2.30, 1e-3), result(2.1, 2.32, 1e-3)],
                  "3e-3": [result(2.2, 2.10, 3e-3), result(2.3, 2.12, 3e-3)]}
    assert report.choose(candidates, "eval_loss") == "1e-3"
    on_test = {k: [{"loss": r["selection"]["test"]["test_loss"]} for r in v] for k, v in candidates.items()}
    assert report.choose(on_test, "loss") == "3e-3"  # what a selection on test would have picked
    assert [report.metric_value(r, "test_loss") for r in candidates["1e-3"]] == [2.30, 2.32]
    with pytest.raises(UserError, match="reads the test split"):
        report.choose(candidates, "test_loss")


def test_report_table_shows_the_validation_choice_and_its_test_metric(tmp_path):
    from gptlab import sweep as sweep_lib

    spec = dict(name="lr_choice", metric="test_loss", stages=[dict(
        name="ft", experiment="finetune", config="configs/finetune.py:full,lm,tiny",
        grid={"data.train_fraction": [1.0], "optimizer.learning_rate": [1e-3, 3e-3]}, seeds=[0, 1])],
        report=dict(columns="data.train_fraction", select=["optimizer.learning_rate"]))
    sweep = sweep_lib.expand(spec, "test", {})
    sweep_lib.write_sweep_json(tmp_path, sweep)
    # Validation prefers 1e-3 (2.0, 2.1); test would prefer 3e-3 (2.10, 2.12).
    numbers = {1e-3: [(2.0, 2.30), (2.1, 2.32)], 3e-3: [(2.2, 2.10), (2.3, 2.12)]}
    for cell in sweep.cells:
        val, test = numbers[cell.factors["optimizer.learning_rate"]][cell.seed]
        run = sweep_lib.run_dir(tmp_path, cell.name)
        run.mkdir(parents=True)
        chosen = {"best_step": 40, "budget_steps": 100, "stopped_early": True, "hit_budget_while_improving": False,
                  "validation": {"eval_loss": val}, "test": {"test_loss": test}}
        config = json.loads(sweep_lib.build_config(cell).to_json_best_effort())  # the cell's own run
        (run / "result.json").write_text(json.dumps({"eval_loss": val + 0.5, "selection": chosen, "step": 70,
                                                     "config": config}))
    markdown = (tmp_path / "report.md")
    report.write_report(tmp_path)
    text = markdown.read_text()
    main = text.split("## Main table", 1)[1].split("\n\n", 2)[1]
    assert "2.3100 ± 0.0141 (learning_rate=0.001)" in main and "2.11" not in main
    assert "40 / 100 (2/2 stopped early)" in text
    spec["report"]["selection_metric"] = "test_loss"
    sweep_lib.write_sweep_json(tmp_path, sweep_lib.expand(spec, "test", {}))
    with pytest.raises(UserError, match="reads the test split"):
        report.write_report(tmp_path)


def test_an_evaluation_only_run_is_scored_on_test(pretrained, data_dir, tmp_path):
    final = finetuned(data_dir, pretrained, "lm", tmp_path, train__num_steps=0, train__early_stopping_patience=0)
    assert final["selection"]["best_step"] == 0 and "test_loss" in final["selection"]["test"]


def test_min_delta_stops_a_run_that_creeps_down_and_keeps_its_best_checkpoint():
    stopping = selection.EarlyStopping("eval_loss", patience=2, min_delta=0.01)
    # 2.0 -> 1.9 is real; then it creeps down by 0.004 an evaluation: two evaluations later it has converged
    for step, value in [(10, 2.0), (20, 1.9), (30, 1.896), (40, 1.892)]:
        stopping.update(step, {"eval_loss": value})
    assert stopping.stopped and (stopping.best_step, stopping.best_value) == (40, 1.892)
    plain = selection.EarlyStopping("eval_loss", patience=2)  # min_delta 0: every improvement resets patience
    for step, value in [(10, 2.0), (20, 1.9), (30, 1.896), (40, 1.892)]:
        plain.update(step, {"eval_loss": value})
    assert not plain.stopped and "reference" not in plain.to_json()
    # resumed from its checkpoint's record, it counts from the same reference
    partway = selection.EarlyStopping("eval_accuracy", patience=2, min_delta=0.01)
    partway.update(1, {"eval_accuracy": 0.5})
    partway.update(2, {"eval_accuracy": 0.505})
    resumed = selection.EarlyStopping.from_json(partway.to_json(), "eval_accuracy", 2, 0.01)
    assert resumed.reference == 0.5 and resumed.best_value == 0.505 and resumed.evals_since_best == 1
    resumed.update(3, {"eval_accuracy": 0.509})
    assert resumed.stopped


def test_result_says_whether_early_stopping_or_the_budget_ended_the_run(make_config, tmp_path, crafted_eval):
    assert train.train_and_evaluate(es_config(make_config, 18), tmp_path / "stopped")["selection"]["stopped_by"] \
        == "early_stopping"
    crafted_eval[0].offset = 0
    crafted_eval[1].clear()
    final = train.train_and_evaluate(es_config(make_config, 9, train__early_stopping_min_delta=0.0), tmp_path / "cap")
    assert final["selection"]["stopped_by"] == "budget" and not final["selection"]["stopped_early"]
    stored = json.loads((tmp_path / "cap" / "result.json").read_text())["selection"]
    assert stored["stopped_by"] == "budget"
