"""A trained run from Python (a notebook, a script): load a workdir's model and generate text.

    from gptlab import workdir
    run = workdir.load("/tmp/gptlab/ft_lora", step="best")   # or a step number; default the latest
    run.generate("def parse(", max_new_tokens=64, temperature=0)
    run.params, run.model_cfg, run.tokenizer                    # for your own code

Any pretraining, fine-tuning or imported workdir; the checkpoint is opened read-only and pinned,
so a run that is still training is undisturbed. Checkpoints written over several devices (or
hosts) load in a one-device process: the restore supplies the shardings. A LoRA run's adapters
come back merged into the kernels, so the plain model computes what the adapted one did.
"""
import dataclasses
from typing import Optional, Sequence, Union

from gptlab import convert, sampling
from gptlab.errors import UserError


@dataclasses.dataclass
class Run:
    """A workdir's model at one checkpoint: parameters, model config, the run's config, its tokenizer."""
    loaded: convert.Loaded

    @property
    def params(self):
        return self.loaded.params

    @property
    def model_cfg(self):
        return self.loaded.model_cfg

    @property
    def config(self) -> dict:
        return self.loaded.config

    @property
    def step(self) -> int:
        return self.loaded.step

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int = 200, top_p: float = 1.0, seed: int = 0, stop_at_end: bool = True):
        """Continues `prompt` (a string: returns a string; a list of strings: a list) with the key/value cache.

        Returns only the new text. temperature=0 is greedy decoding; `stop_at_end` stops a
        continuation at the end-of-text token. The same arguments give the same text.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokenizer = self.tokenizer
        ids = [tokenizer.encode(p, strict=True) for p in prompts]
        for text, encoded in zip(prompts, ids):
            if len(encoded) == 0:
                raise UserError(f"the prompt {text!r} encodes to no tokens: give some text to continue")
        new = sampling.generate(self.params, self.model_cfg, ids, max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, end_token=tokenizer.eot_id if stop_at_end else None,
                                seed=seed)
        texts = [tokenizer.decode([int(t) for t in tokens]) for tokens in new]
        return texts[0] if isinstance(prompt, str) else texts


def load(workdir, step: Optional[Union[int, str]] = None) -> Run:
    """The model of `workdir` at `step` (a number, "best" for the best checkpoint on validation, None: the latest)."""
    return Run(convert.load_workdir(workdir, None if step is None else str(step)))
