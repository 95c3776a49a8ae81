"""Every entry point in experiments/ answers --help: its flags, exit status 0, no traceback."""
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

ENTRY_POINTS = sorted(p.stem for p in (pathlib.Path(REPO) / "experiments").glob("*.py") if p.stem != "__init__")


def check_help(names) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # All at once: each spends its time importing, so the check costs about one import per core.
    running = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name in names}
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and "Traceback" not in output, f"experiments.{name} --help:\n{output[-3000:]}"
        if name == "lm_eval":  # a thin wrapper over lm-evaluation-harness's own command line: its usage
            assert "usage: lm-eval" in output and "--model" in output, output[-3000:]
            continue
        assert f"experiments/{name}.py:" in output and "\n  --" in output, output[-3000:]  # its own flags listed


def test_help_of_entry_points_whose_config_is_required():
    check_help(["sweep", "study"])  # --config has no default there (an AttributeError before)


@pytest.mark.slow
def test_every_entry_point_answers_help():
    assert {"pretrain", "finetune", "sweep", "study", "report", "compare"} <= set(ENTRY_POINTS)
    check_help(ENTRY_POINTS)
