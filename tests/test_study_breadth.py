"""The study's round-3 analysis on synthetic results: the censored transfer fit with its seed bootstrap, several
pretraining seeds, depth against breadth, Holm over the paired table, and cells that hit their cap."""
import json
import math

import numpy as np

from gptlab import stats
from projects.pretrain_vs_finetune import analysis
from projects.pretrain_vs_finetune import report as study_lib

ALPHA, BETA, K = 0.4, 0.5, 10.0  # the transfer law the synthetic fine-tuned models obey
SIZES = {"s1": 1e4, "s2": 4e4, "s3": 1.6e5}
FRACTIONS = [2.0 ** -k for k in range(7, -1, -1)]
TRAIN_TOKENS = 1_000_000
SEEDS = list(range(5))


def _cell(stage, seed, test, val=None, lr=1e-3, fraction=None, n=1e4, metric="loss", breadth=None, hit=False,
          trainable=1000):
    factors = {"optimizer.learning_rate": lr, **({"data.train_fraction": fraction} if fraction is not None else {})}
    out = {"cell": f"{stage}-{lr}-{fraction}-{seed}", "stage": stage, "seed": seed, "factors": factors,
           "validation": {f"eval_{metric}": test if val is None else val}, "test": {f"test_{metric}": test},
           "best_step": 40, "last_step": 80, "stopped_early": not hit, "hit_budget": hit,
           "params": {"trainable": trainable, "total": 20_000, "non_embedding": int(n)},
           "optimizer_state_bytes": 8 * trainable, "train_data_tokens": int(TRAIN_TOKENS * (fraction or 1.0)),
           "batch_tokens": 1024, "wall_time_s": 10.0, "peak_rss_mb": 500.0, "tokens_per_sec": 10_240.0,
           "commit": "abc1234def", "dirty": False, "device": {"kind": "cpu", "count": 1}}
    if breadth is not None:
        out["breadth"] = {"dataset": "broad", "split": "validation", "tokens": 4096,
                          "before": {"loss": 1.0, "bits_per_byte": breadth[0]},
                          "after": {"loss": 1.1, "bits_per_byte": breadth[1]}}
    return out


def _scratch_loss(d, n):  # flat in log-log (exponent 0.05): a 1% loss change is a 20% change of D
    return 3.0 * (d / 1e3) ** -0.05 * (n / 1e4) ** -0.02


def _spec(sizes, tasks=None, task_size=None):
    return {"preset": "test", "fractions": FRACTIONS, "seeds": SEEDS, "select": "optimizer.learning_rate",
            "task_size": task_size or list(sizes)[-1],
            "sizes": {s: {"pretrain": f"pretrain_{s}", "scratch": f"scratch_{s}", "finetuned": f"full_{s}",
                          "zero_shot": f"zero_{s}_lm"} for s in sizes},
            "tasks": tasks or {"lm": {"zero_shot": f"zero_{list(sizes)[-1]}_lm",
                                      "arms": {"full": f"full_{list(sizes)[-1]}"}, "selection_metric": "eval_loss"}}}


def _load(tmp_path, spec, records) -> study_lib.StudyReport:
    directory = tmp_path / "study"
    directory.mkdir(parents=True)
    (directory / study_lib.RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / study_lib.SPEC).write_text(json.dumps({
        "name": "synthetic", "description": "synthetic", "source": "projects/pretrain_vs_finetune/config.py:small",
        "study": spec, "cells_in_sweep": len(records), "runs": [{"wall_time_s": 60.0, "finished": True}]}))
    return study_lib.load(directory)


def _transfer_records(pretrain_seeds=(0,)):
    """Scratch curves and fine-tuned points whose D_T follows the law exactly, blurred by seed noise: each seed's
    fine-tuned loss is off by 2.5% (half a unit of log D_E), so the points scatter and the largest D_T fall beyond
    every scratch run (censored)."""
    rng = np.random.default_rng(1)
    records = []
    for size, n in SIZES.items():
        records += [_cell(f"pretrain_{size}", s, 2.0, n=n) for s in pretrain_seeds]
        records.append(_cell(f"zero_{size}_lm", 0, 3.5, n=n))
        for fraction in FRACTIONS:
            d_f = TRAIN_TOKENS * fraction
            d_t = K * d_f ** ALPHA * n ** BETA
            for seed in SEEDS:
                records.append(_cell(f"scratch_{size}", seed, _scratch_loss(d_f, n) * math.exp(rng.normal(0, 0.002)),
                                     fraction=fraction, n=n))
                loss = _scratch_loss(d_f + d_t, n) * math.exp(rng.normal(0, 0.025))
                records.append(_cell(f"full_{size}", seed, loss, fraction=fraction, n=n))
    return records


def test_censored_fit_and_seed_bootstrap_recover_the_law(tmp_path):
    study = _load(tmp_path, _spec(SIZES), _transfer_records())
    points = study.transfer_points()
    assert sum(p.censored == "above" for *_, p in points) >= 4  # beyond every scratch run: bounds
    fit, notes, why = study.censored_fit(points)
    assert why is None and fit.n_lower >= 2  # at fraction 1 a bound says only D_T > 0
    boot = study.bootstrap()
    assert boot["replicates"] == analysis.BOOTSTRAP_REPLICATES and boot["failed"]["censored"] == 0
    for name, truth in (("alpha", ALPHA), ("beta", BETA)):
        low, high = boot["censored"][name]
        assert low < truth < high, (name, low, high)
        assert low <= getattr(fit, name) <= high
    # The old fit reads only the points inside the scratch curve (its bias: tests/test_transfer.py).
    ols, _ = study.transfer_fit(points)
    assert ols.n == fit.n_exact < fit.n
    # Fixed RNG seed: the report is reproducible.
    assert _load(tmp_path / "again", _spec(SIZES), _transfer_records()).bootstrap() == boot
    lines, _ = study.conclusions()
    assert any(line.startswith("Effective data transferred, fitted as D_T = k D_F^alpha N^beta by a censored")
               and "grows with narrow data D_F" in line for line in lines)


def test_several_pretraining_seeds_are_resampled_as_clusters(tmp_path):
    study = _load(tmp_path, _spec(SIZES), _transfer_records(pretrain_seeds=(0, 1)))
    assert study.pretrain_seeds() == [0, 1]
    assert [study.pretrain_seed_of(s) for s in (0, 1, 2, 3, 4)] == [0, 1, 0, 1, 0]  # seed s: the (s mod 2)-th
    boot = study.bootstrap()
    assert boot["clusters"] == 2 and boot["seeds"] == len(SEEDS)
    assert any("2 pretraining runs per size" in c for c in study.caveats())
    spec = {**_spec(SIZES), "pretrain_seeds": [10, 20, 30]}  # the config may name them
    assert _load(tmp_path / "named", spec, _transfer_records()).pretrain_seed_of(4) == 20


def _breadth_records():
    """Task size s1; lm: zero-shot 3.0; full gains 1.0 and forgets 0.2 bits/byte, lora r4 gains 0.6 and forgets
    0.05, head gains 0.3 and forgets nothing; classify: full +0.3 accuracy forgetting 0.1, lora +0.1 forgetting 0.15
    (LoRA learns less but forgets more there). Seeds add +-0.01 to both."""
    records = [_cell("pretrain_s1", 0, 2.0), _cell("zero_s1_lm", 0, 3.0),
               _cell("zero_s1_classify", 0, 0.2, metric="accuracy")]
    jitter = {0: -0.01, 1: 0.0, 2: 0.01}
    for seed, j in jitter.items():
        for fraction in (0.5, 1.0):
            gain = 1.0 if fraction == 1.0 else 0.8
            records.append(_cell("scratch_s1", seed, 2.9, fraction=fraction))
            records.append(_cell("full_s1", seed, 3.0 - gain + j, fraction=fraction, breadth=(1.5, 1.7 + j)))
        records.append(_cell("lora_r4_lm", seed, 2.4 + j, breadth=(1.5, 1.55 + j)))
        records.append(_cell("head_lm", seed, 2.7 + j, breadth=(1.5, 1.5 + j)))
        records.append(_cell("full_classify", seed, 0.5 + j, metric="accuracy", breadth=(1.5, 1.6 + j)))
        records.append(_cell("lora_r4_classify", seed, 0.3 + j, metric="accuracy", breadth=(1.5, 1.65 + j)))
    tasks = {"lm": {"zero_shot": "zero_s1_lm", "arms": {"full": "full_s1", "head": "head_lm", "lora r4": "lora_r4_lm"},
                    "selection_metric": "eval_loss"},
             "classify": {"zero_shot": "zero_s1_classify", "arms": {"full": "full_classify",
                                                                    "lora r4": "lora_r4_classify"},
                          "selection_metric": "eval_accuracy"}}
    spec = {**_spec({"s1": 1e4}, tasks, "s1"), "fractions": [0.5, 1.0], "seeds": [0, 1, 2]}
    return spec, records


def test_depth_against_breadth_table_and_the_lora_ordering(tmp_path):
    spec, records = _breadth_records()
    study = _load(tmp_path, spec, records)
    header, rows = study.tables()["breadth"]
    table = {(r[0], r[1], r[3]): r for r in rows}
    assert set(table) == {("full", "lm", "1/2"), ("full", "lm", "1"), ("lora r4", "lm", "1"), ("head", "lm", "1"),
                          ("full", "classify", "1"), ("lora r4", "classify", "1")}
    # depth = zero - loss (lm), accuracy - zero (classify); breadth lost = after - before; +-0.01 jitter over seeds.
    half = stats.t_interval([-0.01, 0.0, 0.01]).half_width
    for key, depth, lost in ((("full", "lm", "1"), 1.0, 0.2), (("full", "lm", "1/2"), 0.8, 0.2),
                             (("lora r4", "lm", "1"), 0.6, 0.05), (("head", "lm", "1"), 0.3, 0.0),
                             (("full", "classify", "1"), 0.3, 0.1), (("lora r4", "classify", "1"), 0.1, 0.15)):
        row = table[key]
        assert row[4] == f"{depth:.4f} ± {half:.4f}" and row[5] == f"{lost:.4f} ± {half:.4f}", key
        assert row[6] == "3" and row[7] == "4,096"
    lines, failed = study.conclusions()
    assert any("LoRA learns less at 2 of 2 (rank, task) pairs and forgets less (a smaller rise in bits per byte on "
               "the pretraining corpus) at 1; both hold at 1 (lora r4, lm)" in line for line in lines)
    assert "Biderman et al.'s ordering at lora r4, classify: LoRA learns less but does not forget less" in failed
    study_lib.write_study(study_dir := tmp_path / "study")
    report = (study_dir / "report.md").read_text()
    assert "## 6. Depth against breadth" in report and "not measured in this run" not in report
    assert (study_dir / "figures" / "depth_breadth.png").stat().st_size > 10_000
    assert (study_dir / "table_breadth.csv").read_text().count("\n") == 7
    tex = (study_dir / "report.tex").read_text()
    first_page = tex[:tex.index(r"\clearpage")]
    for part in (r"\paragraph{Setup}", r"\paragraph{Conclusions}", r"\paragraph{What did not hold}",
                 r"\paragraph{Caveats}", "Biderman"):
        assert part in first_page


def test_old_results_without_breadth_say_so(tmp_path):
    spec, records = _breadth_records()
    for r in records:
        r.pop("breadth", None)
    study = _load(tmp_path, spec, records)
    assert study.tables()["breadth"][1] == []
    _, failed = study.conclusions()
    assert "breadth (what fine-tuning costs the general model) was not measured in this run" in failed
    assert any("not measured in this run" in c for c in study.caveats())


def test_paired_table_is_holm_corrected_and_capped_cells_are_listed(tmp_path):
    spec, records = _breadth_records()
    records[5]["hit_budget"] = True  # one scratch cell ended at its cap while improving
    study = _load(tmp_path, spec, records)
    tested = study.tested_comparisons()
    p = [row[4] for row in tested]
    adjusted, kept = stats.holm(p)
    assert [row[5] for row in tested] == adjusted and [row[6] for row in tested] == kept
    assert len(tested) == len(study.comparisons()) >= 3
    header, rows = study.tables()["paired"]
    assert header[-3:] == ["p (paired t)", "p (Holm)", "verdict (Holm, 5%)"]
    capped, count, total = study.capped_cells()
    assert count == 1 and total == len(records) - 1  # the pretraining cell is not counted
    assert capped == [(records[5]["stage"], records[5]["factors"].get("data.train_fraction"), 1e-3,
                       [records[5]["seed"]])]
    assert any(f"1 of {total} scratch and fine-tuning cells" in c for c in study.caveats())
