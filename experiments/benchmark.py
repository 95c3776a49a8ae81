"""Times the real training step and prints one JSON line of results on stdout (the log goes to stderr).

    python -m experiments.benchmark --config=configs/pretrain.py:small --steps=20 [--warmup=3] \
        [--synthetic] [--compare=torch] [--sample] [--config.model.n_layer=6 ...]

--synthetic feeds random tokens instead of the dataset (nothing is prepared);
--compare=torch also times two PyTorch peers of the same shapes (transformers' GPT2LMHeadModel
and a nanoGPT-style model), alternating blocks of steps with gptlab's (pip install -e ".[bench]");
--sample also times sampling (gptlab's generate, and with --compare Hugging Face generate).
"""
import contextlib
import json
import sys

from absl import flags
from ml_collections import config_flags

from gptlab import benchmark, cli
from gptlab.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py:small", "Experiment config file and preset, e.g. configs/pretrain.py:tiny.",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (per framework).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the first (compiling) one.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Random tokens instead of the dataset; prepares nothing.")
_COMPARE = flags.DEFINE_enum("compare", "", list(benchmark.COMPARE),
                             "Also time PyTorch: torch (both peers), transformers or nanogpt.")
_BLOCKS = flags.DEFINE_integer("blocks", 4, "With --compare: the timed steps alternate in this many blocks each.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "With --compare: run the PyTorch peers under torch.compile.")
_SAMPLE = flags.DEFINE_bool("sample", False, "Also time sampling (vs Hugging Face generate with --compare).")
_SAMPLE_ONLY = flags.DEFINE_bool("sample_only", False, "Time sampling only, no train step.")
_SAMPLE_BATCHES = flags.DEFINE_list("sample_batch_sizes", ["1", "8"], "Batch sizes to sample with.")
_SAMPLE_PROMPT = flags.DEFINE_integer("sample_prompt_len", 16, "Prompt tokens per row when sampling.")
_SAMPLE_NEW = flags.DEFINE_integer("sample_new_tokens", 128, "New tokens per row when sampling.")


def main():
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        batch_sizes = [int(b) for b in _SAMPLE_BATCHES.value]
    except ValueError:
        raise UserError(f"--sample_batch_sizes={','.join(_SAMPLE_BATCHES.value)} must be integers, e.g. 1,8") from None
    if any(b < 1 for b in batch_sizes) or _SAMPLE_NEW.value < 1 or _SAMPLE_PROMPT.value < 1:
        raise UserError("--sample_batch_sizes, --sample_prompt_len and --sample_new_tokens must be positive")
    result = {}
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON line alone (TFDS prints when preparing)
        if not _SAMPLE_ONLY.value:
            result = benchmark.run(_CONFIG.value, _STEPS.value, _WARMUP.value, _SYNTHETIC.value, _COMPARE.value,
                                   _BLOCKS.value, log=log, torch_compile=_TORCH_COMPILE.value)
        if _SAMPLE.value or _SAMPLE_ONLY.value:
            result.update(benchmark.sampling(_CONFIG.value, batch_sizes, _SAMPLE_PROMPT.value, _SAMPLE_NEW.value,
                                             compare=bool(_COMPARE.value), log=log))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
