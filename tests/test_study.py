"""The study report (projects/pretrain_vs_finetune/): choices on validation, the six parts, and the committed report."""
import json
import pathlib
import re
import shutil

import pytest

from gptlab import stats
from projects.pretrain_vs_finetune import document
from projects.pretrain_vs_finetune import report as study_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "results" / "pretrain_vs_finetune"
SEEDS = (0, 1, 2)
FRACTIONS = [0.25, 0.5, 1.0]
TRAIN_TOKENS = 100_000


def _record(stage, seed, val, test, lr=1e-3, fraction=None, trainable=1000, non_embedding=10_000, metric="loss"):
    factors = {"optimizer.learning_rate": lr}
    if fraction is not None:
        factors["data.train_fraction"] = fraction
    return {"cell": f"{stage}-{lr}-{fraction}-{seed}", "stage": stage, "seed": seed, "factors": factors,
            "validation": {f"eval_{metric}": val}, "test": {f"test_{metric}": test}, "best_step": 40, "last_step": 80,
            "stopped_early": True, "hit_budget": False,
            "params": {"trainable": trainable, "total": 20_000, "non_embedding": non_embedding},
            "optimizer_state_bytes": 8 * trainable, "train_data_tokens": int(TRAIN_TOKENS * (fraction or 1.0)),
            "batch_tokens": 1024, "wall_time_s": 10.0, "peak_rss_mb": 500.0, "tokens_per_sec": 10_240.0,
            "commit": "abc1234def", "dirty": False, "device": {"kind": "cpu", "count": 1}}


def _scratch_loss(d, n):  # a power law in data whose level falls with size: D_E is known exactly
    return 3.0 * (d / 1000) ** -0.1 * (n / 1e4) ** -0.05


def _spec():
    return {"preset": "test", "fractions": FRACTIONS, "seeds": list(SEEDS), "select": "optimizer.learning_rate",
            "task_size": "b",
            "sizes": {s: {"pretrain": f"pretrain_{s}", "scratch": f"scratch_{s}", "finetuned": f"full_{s}",
                          "zero_shot": f"zero_{s}_lm"} for s in ("a", "b")},
            "tasks": {"lm": {"zero_shot": "zero_b_lm", "arms": {"full": "full_b", "head": "head_lm",
                                                                 "lora r4": "lora_r4_lm"},
                             "selection_metric": "eval_loss"},
                      "classify": {"zero_shot": "zero_b_classify", "arms": {"full": "full_classify",
                                                                             "head": "head_classify",
                                                                             "lora r4": "lora_r4_classify"},
                                   "selection_metric": "eval_accuracy"}}}


def _records():
    records = []
    sizes = {"a": 10_000, "b": 100_000}
    jitter = {0: -0.01, 1: 0.0, 2: 0.01}
    for size, n in sizes.items():
        for fraction in FRACTIONS:
            d = TRAIN_TOKENS * fraction
            for seed in SEEDS:
                s = _scratch_loss(d, n) + jitter[seed]
                # The better learning rate on validation (1e-3) is the worse one on test: the report must pick 1e-3.
                records.append(_record(f"scratch_{size}", seed, s, s, 1e-3, fraction, non_embedding=n))
                records.append(_record(f"scratch_{size}", seed, s + 0.1, s - 0.05, 3e-3, fraction, non_embedding=n))
                # Fine-tuned at D_F reaches the scratch loss of 2 x D_F (inside the curve below fraction 1).
                f = _scratch_loss(2 * d, n) + jitter[seed]
                records.append(_record(f"full_{size}", seed, f, f, 5e-4, fraction, non_embedding=n))
        records.append(_record(f"zero_{size}_lm", 0, 4.0, 4.0, 5e-4, non_embedding=sizes[size]))
    full_lm = {seed: _scratch_loss(2 * TRAIN_TOKENS, 1e5) + jitter[seed] for seed in SEEDS}
    zero_lm = 4.0
    for seed in SEEDS:  # head gets half of full's gain, LoRA three quarters
        gain = zero_lm - full_lm[seed]
        records.append(_record("head_lm", seed, zero_lm - 0.5 * gain, zero_lm - 0.5 * gain, 3e-3, trainable=100))
        records.append(_record("lora_r4_lm", seed, zero_lm - 0.75 * gain, zero_lm - 0.75 * gain, 2e-3, trainable=300))
        for stage, acc, trainable in (("full_classify", 0.8, 20_000), ("head_classify", 0.5, 100),
                                      ("lora_r4_classify", 0.6, 300)):
            a = acc + jitter[seed]
            records.append(_record(stage, seed, a, a, 1e-3, trainable=trainable, metric="accuracy"))
    records.append(_record("zero_b_classify", 0, 0.2, 0.2, 1e-3, metric="accuracy"))
    return records


def _write(directory: pathlib.Path, records) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / study_lib.RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / study_lib.SPEC).write_text(json.dumps({
        "name": "test_study", "description": "synthetic", "source": "projects/pretrain_vs_finetune/config.py:small",
        "study": _spec(), "cells_in_sweep": len(records), "runs": [{"wall_time_s": 60.0, "finished": True}]}))
    return directory


def _study(tmp_path):
    return study_lib.load(_write(tmp_path / "study", _records()))


def test_learning_rate_is_chosen_on_validation_not_test(tmp_path):
    study = _study(tmp_path)
    choice = study.choose("scratch_a", "eval_loss", 0.5)
    assert choice.learning_rate == 1e-3  # 3e-3 is better on test, worse on validation
    assert sorted(choice.values("test_loss")) == list(SEEDS)
    with pytest.raises(Exception, match="validation only"):
        study.choose("scratch_a", "test_loss", 0.5)


def test_effective_data_of_the_study_recovers_the_known_answer(tmp_path):
    study = _study(tmp_path)
    points = {(size, fraction): p for size, _, fraction, p in study.transfer_points()}
    for size in ("a", "b"):
        for fraction in (0.25, 0.5):  # fine-tuned at D_F is worth 2 D_F of scratch data: D_T = D_F
            p = points[(size, fraction)]
            assert p.censored is None
            assert p.effective_tokens == pytest.approx(2 * TRAIN_TOKENS * fraction, rel=1e-6)
            assert p.transferred_tokens == pytest.approx(TRAIN_TOKENS * fraction, rel=1e-6)
        assert points[(size, 1.0)].censored == "above"  # below the best scratch loss: only a bound
    fit, why = study.transfer_fit(study.transfer_points())
    assert why is None and fit.n == 4
    assert fit.alpha == pytest.approx(1.0, abs=1e-6) and fit.beta == pytest.approx(0.0, abs=1e-6)
    # The conclusions say only what the exponents' intervals support: growth with D_F, none shown with N.
    lines, failed = study.conclusions()
    fit_line = next(line for line in lines if line.startswith("Effective data transferred"))
    assert "grows with narrow data D_F (alpha 1.00" in fit_line
    assert "has no growth shown with model size N (beta " in fit_line
    assert [f for f in failed if "transfer law" in f] == [next(f for f in failed if "transfer law's beta" in f)]


def test_share_of_full_fine_tunings_gain_is_per_seed(tmp_path):
    study = _study(tmp_path)
    table = study.task_table()
    lm = table["lm"]
    head = study.gain_share(lm["arms"]["head"], lm["arms"]["full"], lm["zero"], "test_loss")
    lora = study.gain_share(lm["arms"]["lora r4"], lm["arms"]["full"], lm["zero"], "test_loss")
    assert head.mean == pytest.approx(0.5) and head.half_width == pytest.approx(0.0, abs=1e-9)
    assert lora.mean == pytest.approx(0.75)
    classify = table["classify"]
    share = study.gain_share(classify["arms"]["head"], classify["arms"]["full"], classify["zero"], "test_accuracy")
    per_seed = [(0.5 + j - 0.2) / (0.8 + j - 0.2) for j in (-0.01, 0.0, 0.01)]  # the mean of per-seed shares
    assert share.mean == pytest.approx(sum(per_seed) / 3) and share.n == 3


def test_paired_comparisons_and_conclusions_say_what_held(tmp_path):
    study = _study(tmp_path)
    comparisons = {(family, what): d for family, what, d, _ in study.comparisons()}
    d = comparisons[("fine-tuned vs scratch", "a, fraction 1/4")]
    expected = stats.paired_difference(
        {s: _scratch_loss(2 * 25_000, 1e4) + j for s, j in zip(SEEDS, (-0.01, 0.0, 0.01))},
        {s: _scratch_loss(25_000, 1e4) + j for s, j in zip(SEEDS, (-0.01, 0.0, 0.01))})
    assert d.mean == pytest.approx(expected.mean) and d.high < 0
    lora_head = comparisons[("LoRA vs head", "lora r4 - head, classify")]
    assert lora_head.mean == pytest.approx(0.1) and lora_head.excludes(0)
    lines, failed = study.conclusions()
    assert any("6 of 6" in line for line in lines)  # fine-tuning wins at every (size, fraction) point
    assert any("classify: lora r4 is better than head" in line for line in lines)
    assert not any("fine-tuned vs scratch" in f for f in failed)


def test_pareto_front():
    points = {"a": (10, 2.0), "b": (100, 1.5), "c": (100, 1.8), "d": (1000, 1.5)}
    assert study_lib.pareto(points) == {"a", "b"}


def test_report_has_every_part_and_is_deterministic(tmp_path):
    directory = _write(tmp_path / "study", _records())
    study_lib.write_study(directory)
    first = {name: (directory / name).read_text() for name in ("report.md", "report.tex")}
    for title in ("Data efficiency", "Effective data transferred", "every task and strategy",
                  "Cost against quality", "Paired differences", "Conclusions"):
        assert title in first["report.md"]
    assert "0.18" in first["report.md"] and "0.38" in first["report.md"]  # beside the paper's exponents
    for figure in ("data_efficiency", "effective_data", "pareto"):
        assert (directory / "figures" / f"{figure}.png").stat().st_size > 10_000
        assert (directory / "figures" / f"{figure}.csv").read_text().count("\n") > 2
    study_lib.write_study(directory)
    assert first == {name: (directory / name).read_text() for name in ("report.md", "report.tex")}


def test_committed_report_is_regenerated_from_its_stored_results(tmp_path):
    """docs/results/pretrain_vs_finetune: report.md, report.tex and every CSV come from results.jsonl."""
    copy = tmp_path / "study"
    copy.mkdir()
    for name in (study_lib.RECORDS, study_lib.SPEC):
        shutil.copy(COMMITTED / name, copy / name)
    study_lib.write_study(copy)
    for name in ("report.md", "report.tex"):
        assert (copy / name).read_text() == (COMMITTED / name).read_text(), name
    committed_csvs = sorted(p.relative_to(COMMITTED) for p in COMMITTED.rglob("*.csv"))
    assert len(committed_csvs) >= 10  # every table and figure has its CSV
    assert committed_csvs == sorted(p.relative_to(copy) for p in copy.rglob("*.csv"))
    for path in committed_csvs:
        assert (copy / path).read_text() == (COMMITTED / path).read_text(), path


@pytest.mark.slow
def test_one_command_runs_the_study_and_writes_the_report(tmp_path):
    """experiments.study on the tiny preset: a partial run already gets a report; the whole run gets every part."""
    import subprocess
    import sys

    workdir = tmp_path / "study"
    base = [sys.executable, "-m", "experiments.study", "--config=projects/pretrain_vs_finetune/config.py:tiny",
            f"--workdir={workdir}"]
    partial = subprocess.run(base + ["--only=^scratch_1x8-train_fraction=1.0"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "## 1. Data efficiency" in (workdir / "study" / "report.md").read_text()  # from one finished cell
    run = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, run.stderr[-2000:]
    study = workdir / "study"
    records = [json.loads(line) for line in (study / study_lib.RECORDS).read_text().splitlines()]
    # 62 cells: 49 run, 13 skipped by the learning-rate choice (seed 1 runs only at seed 0's chosen rate)
    assert len(records) == 49 and all(r["test"] for r in records)  # every cell scored on test
    choices = json.loads((workdir / "choices.json").read_text())["choices"]
    assert choices and all(c["decided"] and c["chosen"] is not None for c in choices)
    chosen = [r for r in records if r.get("choice")]
    assert chosen and all(r["choice"]["chosen"] for r in chosen if r["seed"] == 1)  # seed 1: the chosen rate only
    finetuned = [json.loads((workdir / "runs" / r["cell"] / "result.json").read_text()) for r in records
                 if r["stage"].startswith(("full_", "head_", "lora_", "zero_"))]
    assert finetuned and all(f["breadth"]["before"]["bits_per_byte"] > 0 and f["breadth"]["after"]["bits_per_byte"] > 0
                             for f in finetuned)
    # classify scores its whole test split: the examples scored are the split's
    classify = [f for f in finetuned if f["config"]["finetune"].get("task") == "classify"]
    assert classify and all(f["selection"]["test_examples"] == f["data_examples"]["test"] for f in classify)
    report = (study / "report.md").read_text()
    assert "49 of 49 cells (13 more skipped" in report and "over 2 invocation(s)" in report
    for part in ("1. Data efficiency", "2. Effective data transferred", "3. One pretrained model", "4. Cost",
                 "5. Paired differences", "share of full FT's gain", "test_macro_f1", "censored", "bootstrap"):
        assert part in report
    assert not re.search(r"\bnan\b", report, re.IGNORECASE)  # every number finite
    breadth = (study / "table_breadth.csv").read_text().splitlines()
    assert len(breadth) > 1 and document.BREADTH_NOT_MEASURED not in report  # the depth-against-breadth table is filled
    assert (study / "figures" / "pareto.csv").exists() and (study / "table_paired.csv").exists()
    again = subprocess.run(base + ["--report_only", f"--workdir={study}"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (study / "report.md").read_text() == report  # the stored results alone give the same report
