"""projects/base_to_chat: the stages its config expands to, the report card's tables from known numbers,
and resuming (a finished stage and a measured run are not redone)."""
import csv
import json
import pathlib
import shutil

import pytest

from gptlab import sweep as sweep_lib
from projects.base_to_chat import report as card_report

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "results" / "chat"


def test_config_expands_to_base_sft_and_dpo_per_seed():
    sweep = sweep_lib.load_sweep("projects/base_to_chat/config.py:cpu")
    names = [c.name for c in sweep.cells]
    dpo_names = [f"dpo-learning_rate=0.0002-seed{seed}" for seed in range(3)]
    assert names == ["base-seed0", "sft-seed0", "sft-seed1", "sft-seed2"] + dpo_names
    by = {c.name: c for c in sweep.cells}
    assert by["base-seed0"].experiment == "pretrain" and by["base-seed0"].overrides["model.block_size"] == 256
    for seed in range(3):
        sft, dpo = by[f"sft-seed{seed}"], by[f"dpo-learning_rate=0.0002-seed{seed}"]
        assert sft.config.endswith("configs/finetune.py:full,chat") and sft.depends_on == "base-seed0"
        assert dpo.config.endswith("configs/finetune.py:full,dpo") and dpo.depends_on == f"sft-seed{seed}"
        assert sft.seed == dpo.seed == seed
        assert sft.overrides["train.early_stopping_patience"] == 0  # each stage hands on its last checkpoint
        assert dpo.overrides["optimizer.learning_rate"] == 2e-4 and dpo.factors == {"optimizer.learning_rate": 2e-4}
    assert sweep.study["report"] == "projects.base_to_chat.report"
    assert [c.stage for c in sweep_lib.load_sweep("projects/base_to_chat/config.py:gpu").cells].count("dpo") == 3
    with pytest.raises(Exception, match="unknown preset"):
        sweep_lib.load_sweep("projects/base_to_chat/config.py:nope")


def _measured(stage, seed, loss, stop, pref, bpb):
    return {"cell": f"{stage}-seed{seed}", "stage": stage, "seed": seed, "step": 10, "assistant_loss": loss,
            "exact_match": 0.0, "parse_rate": 0.5, "stop_rate": stop, "preference_accuracy": pref,
            "bits_per_byte": bpb, "replies": 20, "write_turns": 6, "pairs": 40,
            "samples": [[["Which module defines `x`?", f"`{stage}`", True]]]}


def synthetic_study(directory: pathlib.Path) -> pathlib.Path:
    """A study directory with known numbers: base, and three seeds of SFT and DPO."""
    directory.mkdir()
    measured = [_measured("base", 0, 3.0, 0.0, 0.40, 2.00)]
    measured += [_measured("sft", s, loss, 0.96, 0.50, 2.02) for s, loss in enumerate((1.9, 2.0, 2.1))]
    measured += [_measured("dpo", s, 2.0, 0.97, pref, 2.04) for s, pref in enumerate((0.60, 0.62, 0.64))]
    for m in measured[1:]:
        m["validation_preference_accuracy"] = m["preference_accuracy"] - 0.05
    selection = {"chosen_learning_rate": 1e-4, "candidates": [
        {"learning_rate": 1e-4, "seeds": [0, 1, 2], "validation_preference_accuracy": 0.57},
        {"learning_rate": 4e-4, "seeds": [0, 1, 2], "validation_preference_accuracy": 0.51}]}
    records = [{"cell": m["cell"], "stage": m["stage"], "seed": m["seed"], "workdir": f"runs/{m['cell']}",
                "wall_time_s": 100.0, "trainable": 1000, "commit": "abcdef0123", "dirty": False,
                "host_cpu": "a CPU"} for m in measured]
    (directory / card_report.CARD).write_text(json.dumps({"measured": measured, "dpo_selection": selection}))
    (directory / card_report.RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / card_report.SPEC).write_text(json.dumps({
        "name": "base_to_chat_test", "description": "known numbers", "source": "projects/base_to_chat/config.py:cpu",
        "study": {"card": {"conversations": 20, "pairs": 40, "cap": 8, "breadth_batches": 2}},
        "runs": [{"wall_time_s": 600.0, "finished": True, "load_average": [2.0, 2.0, 2.0], "cpu": "Some CPU"}]}))
    return directory


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_report_tables_from_known_numbers(tmp_path):
    study = synthetic_study(tmp_path / "study")
    card_report.write_study(study)
    stages = {row[0]: row for row in _csv(study / "table_stages.csv")}
    header = _csv(study / "table_stages.csv")[0]
    assert stages["base"][header.index("assistant-token loss")] == "3.000"
    # SFT: mean 2.0, sd 0.1, n 3: half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248
    assert stages["chat SFT"][header.index("assistant-token loss")] == "2.000 ± 0.248"
    assert stages["chat SFT"][header.index("seeds")] == "3"
    assert stages["DPO"][header.index("preference accuracy")] == "62.0 ± 5.0%"
    assert stages["DPO"][header.index("trainable params")] == "1,000"
    targets = {row[0]: row[2] for row in _csv(study / "table_targets.csv")[1:]}
    assert list(targets.values()) == ["met", "met", "met", "met"]  # stop 96%; loss 33% below; +12 points; +0.99%
    paired = {(row[0], row[1]): row for row in _csv(study / "table_paired.csv")[1:]}
    row = paired[("DPO - chat SFT", "preference_accuracy")]
    assert row[2].startswith("+12.00% [") and row[3] == "3" and row[4] == "better"
    chosen = {row[0]: row for row in _csv(study / "table_dpo_selection.csv")[1:]}
    assert chosen["0.0001"][2:] == ["57.0%", "chosen"] and chosen["0.0004"][3] == ""
    assert chosen["chat SFT (no DPO)"][2] == "45.0%"
    report = (study / "report.md").read_text()
    assert "Some CPU" in report and "10.0 min over 1 invocation(s)" in report and "'sft'" in report
    first = report
    card_report.write_study(study)
    assert (study / "report.md").read_text() == first  # the stored files alone give the same report


def test_targets_not_met_are_said(tmp_path):
    study = synthetic_study(tmp_path / "study")
    card = json.loads((study / card_report.CARD).read_text())
    for m in card["measured"]:
        if m["stage"] == "dpo":
            m["preference_accuracy"], m["bits_per_byte"] = 0.5 + 0.01 * (m["seed"] - 1), 2.5
    (study / card_report.CARD).write_text(json.dumps(card))
    card_report.write_study(study)
    targets = [row[2] for row in _csv(study / "table_targets.csv")[1:]]
    assert targets == ["met", "met", "not met", "not met"]


def _fake_finished(workdir, cell):
    """A run directory whose result.json records the cell's configuration: the sweep counts it finished."""
    run = sweep_lib.run_dir(workdir, cell.name)
    run.mkdir(parents=True)
    init_from = str(sweep_lib.run_dir(workdir, cell.depends_on)) if cell.depends_on else None
    config = json.loads(sweep_lib.build_config(cell, init_from=init_from).to_json_best_effort())
    (run / "config.json").write_text(json.dumps(config))
    (run / "result.json").write_text(json.dumps({"config": config, "artefacts": [], "timing": {"wall_time_s": 1.0},
                                                 "params": {"trainable": 5}}))


def test_resuming_redoes_neither_a_finished_stage_nor_its_measurement(tmp_path):
    sweep = sweep_lib.load_sweep("projects/base_to_chat/config.py:tiny")
    workdir = tmp_path / "sweep"
    workdir.mkdir()
    sweep_lib.write_sweep_json(workdir, sweep)
    base = sweep.cell("base-seed0")
    _fake_finished(workdir, base)
    result = sweep_lib.run_dir(workdir, base.name) / "result.json"
    before = result.stat().st_mtime_ns
    runner = sweep_lib.Runner(sweep, workdir, in_process=True)
    assert dict((c.name, s["status"]) for c, s in runner.plan("^base"))["base-seed0"] == "finished"
    states = runner.run("^base")  # nothing to do: the finished stage is not run again
    assert states["base-seed0"]["status"] == "finished" and result.stat().st_mtime_ns == before
    calls = []

    def measure(run_dir, base_config, settings):
        calls.append(pathlib.Path(run_dir).name)
        return {"step": 6, "assistant_loss": 1.0, "stop_rate": 0.0, "preference_accuracy": 0.5, "bits_per_byte": 3.0}

    def validate(run_dir, settings):
        calls.append("validate " + pathlib.Path(run_dir).name)
        return {"validation_preference_accuracy": 0.5, "validation_pairs": 6}

    card_report.collect(workdir, measure, validate)
    card_report.collect(workdir, measure, validate)  # a rerun: the measurement is cached
    assert calls == ["base-seed0"]
    card = json.loads((workdir / "study" / card_report.CARD).read_text())
    assert card["measured"][0]["assistant_loss"] == 1.0 and card["dpo_selection"]["chosen_learning_rate"] is None


def test_dpo_learning_rate_is_chosen_on_validation_and_only_its_runs_are_measured(tmp_path):
    sweep = sweep_lib.load_sweep("projects/base_to_chat/config.py:tiny")
    workdir = tmp_path / "sweep"
    workdir.mkdir()
    sweep_lib.write_sweep_json(workdir, sweep)
    for cell in sweep.cells:
        _fake_finished(workdir, cell)
    measured = []
    validation = {1e-4: 0.6, 4e-4: 0.7}  # on validation the larger rate wins

    def measure(run_dir, base_config, settings):
        measured.append(pathlib.Path(run_dir).name)
        return {"preference_accuracy": 0.1}  # test numbers never take part in the choice

    def validate(run_dir, settings):
        name = pathlib.Path(run_dir).name
        lr = 4e-4 if "0.0004" in name else 1e-4
        return {"validation_preference_accuracy": validation[lr] if name.startswith("dpo") else 0.5}

    card_report.collect(workdir, measure, validate)
    card = json.loads((workdir / "study" / card_report.CARD).read_text())
    assert card["dpo_selection"]["chosen_learning_rate"] == 4e-4
    assert sorted(n for n in measured if n.startswith("dpo")) == ["dpo-learning_rate=0.0004-seed0",
                                                                   "dpo-learning_rate=0.0004-seed1"]


@pytest.mark.skipif(not (COMMITTED / card_report.CARD).exists(), reason="no committed report card yet")
def test_committed_report_card_is_regenerated_from_its_stored_results(tmp_path):
    copy = tmp_path / "study"
    copy.mkdir()
    for name in (card_report.RECORDS, card_report.SPEC, card_report.CARD):
        shutil.copy(COMMITTED / name, copy / name)
    card_report.write_study(copy)
    for path in sorted(COMMITTED.glob("*.csv")) + [COMMITTED / "report.md"]:
        assert (copy / path.name).read_text() == path.read_text(), path.name


def test_a_long_prompt_is_cut_from_the_left_so_the_answer_stays_in_the_window():
    """The chat preset's context fix: a prompt longer than the window costs context, not the answer."""
    import numpy as np

    from gptlab import tokenizers
    from gptlab.chat import data as chat_data
    from gptlab.chat import template

    tok = template.with_chat_tokens(tokenizers.ByteTokenizer())
    messages = [{"role": "system", "content": "s" * 50}, {"role": "user", "content": "u" * 100},
                {"role": "assistant", "content": "the answer"}]
    ids, mask = template.render(tok, messages)
    cut_ids, cut_mask = template.keep_answer(ids, mask, 40)
    assert len(cut_ids) == 40 and cut_ids[0] == tok.eot_id
    assert tok.decode(cut_ids[cut_mask == 1]) == "the answer" and cut_ids[-1] == tok.end_id
    assert cut_ids[np.flatnonzero(cut_mask)[0] - 1] == tok.chat_ids[template.ASSISTANT]
    assert template.keep_answer(ids, mask, len(ids)) == (ids, mask)  # what fits is untouched
    arrays, skipped = chat_data.encode_conversations(tok, [{"messages": messages}], 39)
    assert skipped == 0 and arrays["weights"].sum() == len("the answer") + 1  # the answer and its <|end|>
    pairs, skipped = chat_data.encode_preferences(
        tok, [{"prompt": messages[:2], "chosen": "yes", "rejected": "no!"}], 39)
    assert skipped == 0 and pairs["chosen_weights"].sum() == 4 and pairs["rejected_weights"].sum() == 4
