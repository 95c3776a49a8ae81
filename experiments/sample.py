"""Samples text from a trained model with a key/value cache.

    python -m experiments.sample --workdir=/tmp/run --prompt="def " --num_samples=3 --max_new_tokens=200
    python -m experiments.sample --workdir=/tmp/run --prompt_file=prompt.txt --temperature=0

Works on any pretraining, fine-tuning or imported (experiments.convert) workdir;
it loads the latest checkpoint (or --step) and says which.
"""
import pathlib

from absl import flags

from gptlab import cli, convert, sampling
from gptlab.errors import UserError

_WORKDIR, _STEP = cli.define_checkpoint_flags("sample from")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A UTF-8 text file whose contents to continue.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "How many continuations of the prompt.")
_MAX_NEW_TOKENS, _TEMPERATURE, _TOP_K, _TOP_P, _SEED = cli.define_sampling_flags(200, 0.8, 200)
_STOP = flags.DEFINE_bool("stop_at_end", True, "Stop a sample when it produces the end-of-text token.")


def read_prompt() -> str:
    if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
        raise UserError("pass exactly one of --prompt=TEXT or --prompt_file=PATH")
    if _PROMPT_FILE.value is not None:
        path = pathlib.Path(_PROMPT_FILE.value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt_file={_PROMPT_FILE.value} ({e}): pass a UTF-8 text file") from None
        if not text:
            raise UserError(f"--prompt_file={_PROMPT_FILE.value} is empty: put the text to continue in it")
        return text
    if not _PROMPT.value:
        raise UserError("--prompt is empty: give some text to continue, e.g. --prompt='def '")
    return _PROMPT.value


def main():
    prompt = read_prompt()
    if _NUM_SAMPLES.value < 1:
        raise UserError(f"--num_samples={_NUM_SAMPLES.value} must be at least 1")
    if not 1 <= _MAX_NEW_TOKENS.value <= sampling.MAX_NEW_TOKENS:  # before the checkpoint is read
        raise UserError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} must be between 1 and {sampling.MAX_NEW_TOKENS:,}: "
                        "for longer texts sample again with the output as the prompt")
    loaded = convert.load_workdir(_WORKDIR.value, _STEP.value)
    tokenizer = loaded.tokenizer
    cfg = loaded.model_cfg
    print(f"loaded step {loaded.step} from {loaded.directory} ({cfg.n_layer} layers, {cfg.n_embd} wide, "
          f"context {cfg.block_size}, {tokenizer.kind} tokenizer)", flush=True)
    ids = tokenizer.encode(prompt, strict=True)
    if len(ids) == 0:
        raise UserError("the prompt encodes to no tokens: give some text to continue")
    samples = sampling.generate(
        loaded.params, cfg, [ids] * _NUM_SAMPLES.value, _MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, end_token=tokenizer.eot_id if _STOP.value else None,
        seed=_SEED.value)
    for i, new in enumerate(samples):
        print(f"--- sample {i + 1}/{len(samples)} ({len(new)} new tokens) ---")
        print(tokenizer.decode(list(ids) + list(new)), flush=True)


if __name__ == "__main__":
    cli.run(main)
