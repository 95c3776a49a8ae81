"""gptlab as a model of EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`).

    python -m experiments.lm_eval --model gptlab --model_args workdir=DIR,step=best \\
        --tasks gptlab_next_line_mc --include_path gptlab/eval_tasks

Importing this module registers the model name `gptlab` (lm-eval 0.4 finds models by
registration, not by entry points; experiments.lm_eval imports it, then runs lm-eval's
own command line). Model arguments: `workdir` (required), `step` (a number, `best`, or
unset: the latest), `batch_size`, `max_length` (default the model's context),
`max_gen_toks` (default 256), `seed` (sampled generation), `tokenizer` (a Hugging Face
tokenizer folder or id, for an imported model whose tokenizer gptlab does not run).

The three request types compute what lm-eval's `hf` model computes for the same weights
(tests/test_eval_harness.py checks it against an `experiments.convert --to_hf` export):
- loglikelihood: context + continuation, left-truncated to `max_length + 1` tokens, one
  forward pass; the score sums the log-probabilities of the continuation's tokens only,
  and `is_greedy` says whether each of them is the argmax.
- loglikelihood_rolling: the text in windows of `max_length` tokens (the first after the
  end-of-text token), each window's context as long as the model allows, every token
  scored exactly once (lm-eval's `get_rolling_token_windows`).
- generate_until: greedy (or sampled, `do_sample`) generation with the key/value cache,
  cut at the first stop string, at most `max_gen_toks` tokens (gptlab.generation).

Batches are sorted by length and padded to fixed shapes (`batch_size` rows, lengths in
buckets of 32 tokens), so an evaluation compiles a few programs and reuses them.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from gptlab import generation, tokenizers
from gptlab import workdir as workdir_lib
from gptlab import model as model_lib
from gptlab.errors import UserError

LENGTH_BUCKET = 32  # sequence lengths are padded up to a multiple of this (and capped at the context)


@functools.partial(jax.jit, static_argnames="cfg")
def _score(params, tokens, targets, *, cfg):
    """Per position: log p(target | tokens up to it), and whether the target is the argmax."""
    logits = model_lib.GPT(cfg).apply({"params": params}, tokens).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class HFTokenizer:
    """A Hugging Face tokenizer behind gptlab's tokenizer interface (for imported models)."""

    kind = "huggingface"

    def __init__(self, source: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(f"tokenizer={source} needs transformers: pip install -e \".[eval]\"") from None
        try:
            self.hf = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise UserError(f"tokenizer={source} cannot be loaded ({str(e).splitlines()[0][:200]}): pass a local "
                            "folder saved with save_pretrained") from None
        self.eot_id = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.bos_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str, strict: bool = False) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False), np.int32)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab workdir's checkpoint as an lm-eval model (see the module docstring)."""

    def __init__(self, workdir: str = None, step=None, batch_size=16, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, seed: int = 0, tokenizer: Optional[str] = None, **unused):
        super().__init__()
        if not workdir:
            raise UserError("--model gptlab needs --model_args workdir=DIR (a gptlab workdir), optionally step=N|best")
        unused = {k: v for k, v in unused.items() if v is not None and k not in ("device", "max_batch_size")}
        if unused:
            raise UserError(f"--model_args {sorted(unused)} are not arguments of the gptlab model: it takes workdir, "
                            "step, batch_size, max_length, max_gen_toks, seed, tokenizer")
        self.run = workdir_lib.load(workdir, None if step in (None, "", "latest") else step)
        cfg = self.run.model_cfg
        if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
            cfg = dataclasses.replace(cfg, attention="xla")  # cuDNN attention exists on NVIDIA GPUs only
        self.cfg, self.params = cfg, self.run.params
        try:
            self.gptlab_tokenizer = HFTokenizer(tokenizer) if tokenizer else self.run.tokenizer
        except UserError as e:  # e.g. an imported Llama: gptlab stores no runnable tokenizer for it
            raise UserError(f"{e}; or pass --model_args ...,tokenizer=DIR (a Hugging Face tokenizer folder or id)") \
                from None
        self._batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") \
            else int(batch_size)
        self._max_length = int(max_length or cfg.block_size)
        if not 1 <= self._max_length <= cfg.block_size:
            raise UserError(f"max_length={max_length} must be between 1 and the model's context {cfg.block_size}")
        self._max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    # --- what lm-eval asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.gptlab_tokenizer.eot_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"gptlab-{self.gptlab_tokenizer.kind}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return [int(t) for t in self.gptlab_tokenizer.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.gptlab_tokenizer.decode(tokens)

    # --- scoring --------------------------------------------------------------------------

    def _bucket(self, length: int) -> int:
        return min(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET, self.cfg.block_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """(log-probability of the continuation, whether greedy decoding gives it) per request."""
        # Longest first, as lm-eval's models do: the first batch sets the padded length of its bucket.
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="gptlab loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            width = self._bucket(max(len((ctx + cont)[-(self.max_length + 1):]) - 1 for _, ctx, cont in chunk))
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            spans = []
            for row, (_, ctx, cont) in enumerate(chunk):
                if not ctx or not cont:
                    raise ValueError("loglikelihood requests need a context and a continuation of at least one token")
                whole = (ctx + cont)[-(self.max_length + 1):]
                length = len(whole) - 1
                tokens[row, :length], targets[row, :length] = whole[:-1], whole[1:]
                spans.append((length - min(len(cont), length), length))
            log_probs, greedy = jax.device_get(_score(self.params, tokens, targets, cfg=self.cfg))
            for row, ((request, _, _), (start, stop)) in enumerate(zip(chunk, spans)):
                answer = (float(log_probs[row, start:stop].astype(np.float64).sum()),
                          bool(greedy[row, start:stop].all()))
                results.append(answer)
                if request is not None:  # rolling windows are cached per document, by the caller
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                progress.update(1)
        progress.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Each text's total log-probability: windows of max_length tokens, every token scored once."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, scores):
            totals[owner] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy (or sampled) continuations, cut before the first stop string, batched per set of settings."""
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="gptlab generate_until")
        for chunk in order.get_batched(n=0):  # one chunk per distinct gen_kwargs; generation batches it
            contexts, settings = zip(*chunk)
            kwargs = normalize_gen_kwargs(settings[0], self.max_gen_toks)
            stop = handle_stop_sequences(kwargs.pop("until", None), eos=tokenizers.EOT)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"max_gen_toks={max_gen_toks} must be less than the model's context "
                                f"{self.max_length}, which must hold the prompt too: lower it (--gen_kwargs max_gen_toks=N)")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok_encode(c) or [self.prefix_token_id] for c in contexts]
            texts = generation.generate_until(
                self.params, self.cfg, self.gptlab_tokenizer, prompts, stop, max_gen_toks,
                temperature=temperature, top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                seed=self.seed, batch_size=self.batch_size)
            for context, setting, text in zip(contexts, settings, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, setting), text)
                progress.update(1)
        progress.close()
        return order.get_original(results)



def hf_byte_tokenizer():
    """gptlab's byte tokenizer as a transformers tokenizer (ids 0-255 the UTF-8 bytes, 256 end-of-text).

    For lm-eval's reference path on an exported byte-level model (`experiments.convert
    --to_hf` writes no tokenizer): `HFLM(pretrained=..., tokenizer=hf_byte_tokenizer())`.
    """
    from transformers import AddedToken, PreTrainedTokenizer

    class ByteTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, **kwargs):
            end = AddedToken(tokenizers.EOT, special=True, normalized=False)
            self._added_tokens_decoder = {256: end}
            super().__init__(eos_token=end, bos_token=end, clean_up_tokenization_spaces=False, **kwargs)

        @property
        def vocab_size(self):
            return 256

        def get_vocab(self):
            return {**{chr(i): i for i in range(256)}, **self.added_tokens_encoder}

        def _tokenize(self, text, **kwargs):
            return [chr(b) for b in text.encode("utf-8")]

        def _convert_token_to_id(self, token):
            return ord(token) if len(token) == 1 and ord(token) < 256 else None

        def _convert_id_to_token(self, index):
            return chr(index)

        def convert_tokens_to_string(self, tokens):
            data = b"".join(bytes([ord(t)]) if len(t) == 1 and ord(t) < 256 else t.encode("utf-8") for t in tokens)
            return data.decode("utf-8", errors="replace")  # as gptlab's ByteTokenizer.decode

        def save_vocabulary(self, save_directory, filename_prefix=None):
            return ()

    return ByteTokenizer()

