"""lm-evaluation-harness's own command line, with gptlab registered as `--model gptlab`.

    python -m experiments.lm_eval --model gptlab --model_args workdir=/tmp/run,step=best \\
        --tasks gptlab_next_line_mc,gptlab_next_line --output_path /tmp/run/lm_eval

Every lm-eval flag works as documented by lm-eval (`--limit`, `--num_fewshot`,
`--log_samples`, `--batch_size`, ...). With `--model gptlab` and no `--output_path`, results
go to WORKDIR/lm_eval/, where experiments.evaluate and reports find them (gptlab/eval_scores.py). Without `--include_path`, gptlab's offline tasks
(gptlab/eval_tasks/: YAML over JSONL files in the repository) are included; with network,
every harness task works the same way (`--tasks hellaswag`). lm-eval 0.4 finds models by
registration only, hence this wrapper: it imports gptlab.eval_harness, then runs lm-eval's main.
Needs `pip install -e ".[eval]"`.
"""
import pathlib
import sys

TASKS = pathlib.Path(__file__).resolve().parents[1] / "gptlab" / "eval_tasks"


def _given(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv, flag: str):
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _gptlab_workdir(argv):
    """The workdir of `--model gptlab --model_args workdir=DIR,...`, else None."""
    if _value(argv, "--model") != "gptlab":
        return None
    for part in (_value(argv, "--model_args") or "").split(","):
        key, _, value = part.partition("=")
        if key.strip() == "workdir" and value:
            return value.strip()
    return None


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate

        from gptlab import eval_harness  # noqa: F401  (registers --model gptlab)
    except ImportError as e:
        print(f"error: experiments.lm_eval needs lm-eval ({e}): pip install -e \".[eval]\"", file=sys.stderr)
        sys.exit(2)
    from absl import logging

    from gptlab.errors import UserError

    logging.set_verbosity(logging.ERROR)  # Orbax logs every checkpoint item it reads, as gptlab's entry points hide

    if not _given(argv, "--include_path"):
        argv += ["--include_path", str(TASKS)]
    workdir = _gptlab_workdir(argv)
    if workdir and not _given(argv, "--output_path"):  # where gptlab.eval_scores finds them
        argv += ["--output_path", str(pathlib.Path(workdir).expanduser() / "lm_eval")]
    sys.argv = [sys.argv[0]] + argv
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
