"""Converts between Hugging Face GPT-2 folders and gptlab workdirs.

    python -m experiments.convert --from_hf=HF_DIR --workdir=OUT   # import: OUT gets a step-0 checkpoint
    python -m experiments.convert --workdir=DIR --to_hf=HF_DIR      # export: config.json + model.safetensors

HF_DIR is a local folder saved with `save_pretrained` (config.json + model.safetensors);
with internet access, --from_hf may also be a hub id such as `gpt2`. The imported
workdir can be sampled, evaluated and used as a fine-tuning `init_from`.
"""
from absl import flags

from configs import pretrain as pretrain_config
from gptlab import cli, convert
from gptlab.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "gptlab workdir: written by --from_hf, read by --to_hf.",
                               required=True)
_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face GPT-2 folder (or hub id) to import into --workdir.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Folder to export --workdir's model to, as a HF GPT-2.")
_STEP = flags.DEFINE_string("step", None, "With --to_hf: the checkpoint step to export, or 'best' (by validation); default the latest.")


def main():
    if bool(_FROM_HF.value) == bool(_TO_HF.value):
        raise UserError("pass exactly one of --from_hf=HF_DIR (import into --workdir) or "
                        "--to_hf=HF_DIR (export --workdir)")
    if _FROM_HF.value:
        # the imported run's config: the `small` preset with the model's own shape, tokenizer and context
        convert.from_hf(_FROM_HF.value, _WORKDIR.value, pretrain_config.get_config("small"))
    else:
        convert.to_hf(_WORKDIR.value, _TO_HF.value, step=_STEP.value)


if __name__ == "__main__":
    cli.run(main)
