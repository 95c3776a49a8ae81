"""lm-evaluation-harness's own command line, with gptlab registered as `--model gptlab`.

    python -m experiments.lm_eval --model gptlab --model_args workdir=/tmp/run,step=best \\
        --tasks gptlab_next_line_mc,gptlab_next_line --output_path /tmp/run/lm_eval

Every lm-eval flag works as documented by lm-eval (`--limit`, `--num_fewshot`,
`--log_samples`, `--batch_size`, ...). Without `--include_path`, gptlab's offline tasks
(gptlab/eval_tasks/: YAML over JSONL files in the repository) are included; with network,
every harness task works the same way (`--tasks hellaswag`). lm-eval 0.4 finds models by
registration only, hence this wrapper: it imports gptlab.eval_harness, then runs lm-eval's main.
Needs `pip install -e ".[eval]"`.
"""
import pathlib
import sys

TASKS = pathlib.Path(__file__).resolve().parents[1] / "gptlab" / "eval_tasks"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate

        from gptlab import eval_harness  # noqa: F401  (registers --model gptlab)
    except ImportError as e:
        print(f"error: experiments.lm_eval needs lm-eval ({e}): pip install -e \".[eval]\"", file=sys.stderr)
        sys.exit(2)
    from gptlab.errors import UserError

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS)]
    sys.argv = [sys.argv[0]] + argv
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
