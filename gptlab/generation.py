"""Generating until a stop string, for evaluators (the harness's generate_until, HumanEval).

`gptlab.sampling.generate` stops a row at the end-of-text token only. Evaluators stop at
strings ("\\n", "\\ndef", ...) that span tokens, so rows are generated in rounds of
`round_tokens` with the key/value cache, and after each round the rows whose text holds
a stop string (or that produced end-of-text, or used their budget) leave the batch; the
rest continue from prompt + text so far. A round wastes at most `round_tokens - 1` tokens
per row, where one long call would run every row to `max_new_tokens`.

Compilation: batches are padded to `batch_size` rows and prompts to multiples of
`round_tokens`, so a whole evaluation compiles a handful of programs, not one per length.
"""
from typing import Optional, Sequence


from gptlab import sampling
from gptlab.errors import UserError


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple:
    """(text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_until(params, cfg, tokenizer, prompts: Sequence[Sequence[int]], stop: Sequence[str],
                   max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, batch_size: int = 16, round_tokens: int = 32) -> list:
    """The continuation of each prompt (token ids) as text, cut before the first stop string.

    Each prompt keeps its last `cfg.block_size - max_new_tokens` tokens (the continuation
    then always fits the context, as in the harness's reference models). Greedy with
    temperature=0; with sampling, the text depends on (seed, the prompt's index) only
    through the batches this function forms, so a rerun gives the same texts.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
    room = cfg.block_size - max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{cfg.block_size} tokens: ask for fewer new tokens")
    end = getattr(tokenizer, "eot_id", None)
    texts = [""] * len(prompts)
    for first in range(0, len(prompts), batch_size):
        rows = list(range(first, min(first + batch_size, len(prompts))))
        contexts = {i: [int(t) for t in prompts[i]][-room:] or ([end] if end is not None else [0]) for i in rows}
        new = {i: [] for i in rows}
        active, round_index = list(rows), 0
        while active:
            # Always a full round (the tokens past max_new_tokens are dropped): one compiled program per
            # prompt bucket. Within the budget every token still has its whole context (prompt + new <= block_size).
            batch = [contexts[i] + new[i] for i in active]
            batch += [batch[0]] * (batch_size - len(batch))  # fixed batch shape: one compilation
            outputs = sampling.generate(params, cfg, batch, round_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, end_token=end, seed=seed * 1_000_003 + first + round_index,
                                        pad_multiple=round_tokens)
            still = []
            for i, tokens in zip(active, outputs):
                budget = max_new_tokens - len(new[i])
                new[i] += [int(t) for t in tokens[:budget]]
                texts[i], stopped = cut_at_stop(tokenizer.decode(new[i]), stop)
                ended = len(tokens) < min(round_tokens, budget)  # sampling stops a row before end-of-text
                if not (stopped or ended or len(new[i]) >= max_new_tokens):
                    still.append(i)
            active, round_index = still, round_index + 1
    return texts


def encode_prompts(tokenizer, texts: Sequence[str], prefix: Optional[int] = None) -> list:
    """Token ids of each text; an empty text becomes [prefix] (the end-of-text token by default)."""
    prefix = tokenizer.eot_id if prefix is None else prefix
    return [[int(t) for t in tokenizer.encode(text)] or [prefix] for text in texts]
