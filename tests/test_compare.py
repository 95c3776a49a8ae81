"""experiments.compare: several workdirs evaluated on the same text, in one table."""
import json

import jax
import pytest

from conftest import tiny_config
from configs import evaluate as evaluate_config
from gptlab import compare, convert, evaluate
from gptlab.errors import UserError
from gptlab.model import init_params


def _save_run(workdir, data_dir, seed, include):
    """A tiny byte-level model (random init `seed`) whose run trained on the files matching `include`."""
    config = json.loads(tiny_config(data_dir, model__vocab_size=257, data__seq_len=64,
                                    data__include=include).to_json_best_effort())
    cfg = convert.model_config(config)
    convert.save_workdir(workdir, init_params(cfg, jax.random.key(seed)), config, {"kind": "byte"}, source="test")
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("compare")
    return (_save_run(root / "a", data_dir, 0, ("[a-c]*",)), _save_run(root / "b", data_dir, 1, ("[d-f]*",)))


def test_compare_evaluates_every_run_on_the_first_runs_text(runs, tmp_path):
    a, b = runs
    quiet = lambda *_: None
    table = compare.compare([str(a), str(b)], evaluate_config.get_config(), log=quiet)
    assert table["text"]["include"] == ("[a-c]*",) and table["text"]["eval_split"] == "validation"
    row_a, row_b = table["rows"]
    assert row_a["bytes"] == row_b["bytes"] > 0 and row_a["loss"] != row_b["loss"]  # same text, two models
    # Each row is what experiments.evaluate reports for that run on that text.
    for workdir, row in ((a, row_a), (b, row_b)):
        config = evaluate_config.get_config()
        config.data.include = ("[a-c]*",)
        alone = evaluate.evaluate(workdir, config, log=quiet)
        assert {k: row[k] for k in ("loss", "bits_per_byte", "tokens", "bytes")} == \
               {k: alone[k] for k in ("loss", "bits_per_byte", "tokens", "bytes")}
    # Evaluated on its own data, run b reads other text: the numbers the README used to set side by side.
    assert evaluate.evaluate(b, evaluate_config.get_config(), log=quiet)["bytes"] != row_b["bytes"]

    markdown_path, json_path = compare.write(table, tmp_path / "out" / "table.md")
    text = markdown_path.read_text()
    assert text.startswith("Evaluated on python_stdlib/validation include=('[a-c]*',)")
    assert "| run | step | task | loss | perplexity | bits_per_byte | tokens | bytes |" in text
    assert f"| {a} | 0 | lm | {row_a['loss']:.4f} |" in text and f"| {b} | 0 | lm | {row_b['loss']:.4f} |" in text
    assert json.loads(json_path.read_text())["rows"][1]["loss"] == row_b["loss"]


def test_compare_overrides_choose_the_text_for_every_run(runs):
    config = evaluate_config.get_config()
    config.data.include, config.num_batches = ("[d-f]*",), 2
    table = compare.compare([str(runs[0]), str(runs[1])], config, log=lambda *_: None)
    assert table["text"]["include"] == ("[d-f]*",)
    assert table["rows"][0]["bytes"] == table["rows"][1]["bytes"] and table["rows"][0]["batches"] == 2


def test_compare_refuses_a_workdir_without_a_checkpoint(runs, tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        compare.compare([str(runs[0]), str(tmp_path)], evaluate_config.get_config(), log=lambda *_: None)
