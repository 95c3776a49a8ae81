"""One stage's checkpoint measured for the report card: depth, breadth and three sample conversations.

Depth, on the held-out chat test split (gptlab/chat/corpus.py; never trained on), each on a fixed
selection (the first `conversations` / `pairs` by a stable hash of their text, the same for every stage):
- assistant-token loss: `gptlab.chat.evaluate.assistant_loss`, the mean loss on assistant text and
  each assistant turn's <|end|>, prompts cut from the left to fit the window (as in training);
- replies: the first user turn of each conversation answered greedily within `cap` tokens (the
  prompt cut from the left to leave room for them); stop rate = share of replies that end with
  <|end|> by themselves; for write-this-function turns, exact match (the body, trailing space
  ignored) and parse rate (signature + docstring + reply parse as Python);
- preference accuracy: the share of test pairs where the model gives the chosen answer a higher
  summed log-probability (answer tokens and <|end|>) than the rejected one, the model itself
  (not DPO's reward against a reference), so base, SFT and DPO compare.
Breadth: bits per byte on the pretraining corpus's validation split (`gptlab.evaluate.lm_metrics`,
what `experiments.evaluate` computes), the base run's data config, the first `breadth_batches` batches.

The base model has no chat tokens: it is measured grown for them exactly as fine-tuning grows it
(`gptlab.chat.vocab`, seed 0), so its chat-token rows are the mean of the others (its stop rate is
what a model that never saw <|end|> does).
"""
import dataclasses
import hashlib
import time

import flax.traverse_util
import jax
import numpy as np
from ml_collections import config_dict

from gptlab import convert
from gptlab import evaluate as evaluate_lib
from gptlab import sampling
from gptlab.chat import corpus, session, template, vocab
from gptlab.chat import data as chat_data
from gptlab.chat import evaluate as chat_evaluate
from gptlab.data import held_out

WRITE = "Write the body of this function:\n"
KINDS = {"write": WRITE, "explain": "What does this function do?", "which_module": "Which module defines"}


def _stable(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_user(messages: list) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def kind_of(question: str) -> str:
    return next((k for k, start in KINDS.items() if question.startswith(start)), "other")


def select(records: list, n: int, key) -> list:
    """The first `n` records by a stable hash of `key(record)`: a fixed selection, mixed across packages."""
    return sorted(records, key=lambda r: _stable(key(r)))[:n]


def test_conversations(n: int, split: str = "test") -> list:
    return select(corpus.conversations(split, held_out.globs(), held_out.STDLIB_TESTS), n,
                  lambda r: repr(r["messages"]))


def test_pairs(n: int, split: str = "test") -> list:
    return select(corpus.preferences(split, held_out.globs(), held_out.STDLIB_TESTS), n,
                  lambda r: repr((r["prompt"], r["chosen"], r["rejected"])))


def sample_prompts(conversations: list) -> list:
    """Three conversations of the selection, one of each kind (the first of each), as (first turn, follow-up)."""
    out = []
    for kind in KINDS:
        for c in conversations:
            users = [m["content"] for m in c["messages"] if m["role"] == "user"]
            if kind_of(users[0]) == kind and len(users) > 1 and len(users[0]) < 400:
                out.append(users[:2])
                break
    return out


@dataclasses.dataclass
class Model:
    params: object
    model_cfg: object
    tokenizer: object
    directory: object
    step: int
    config: dict


def load(run_dir, step=None) -> Model:
    """A run's checkpoint with the chat tokens: grown for them (as fine-tuning does) when it lacks them."""
    loaded = convert.load_workdir(run_dir, step, strict=False)
    params, cfg, tokenizer = loaded.params, loaded.model_cfg, loaded.tokenizer
    growth = vocab.chat_growth(loaded.tokenizer_spec)
    if growth is not None:
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        size = max(int(flat["wte/embedding"].shape[0]), growth[1])
        flat = vocab.grow_params(flat, growth[0], size, len(template.CHAT_TOKENS), 0)
        params = flax.traverse_util.unflatten_dict(flat, sep="/")
        cfg = dataclasses.replace(cfg, vocab_size=size)
        tokenizer = template.with_chat_tokens(tokenizer)
    cfg = dataclasses.replace(cfg, dropout=0.0)
    if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        cfg = dataclasses.replace(cfg, attention="xla")
    return Model(params, cfg, tokenizer, loaded.directory, loaded.step, loaded.config)


def replies(model: Model, conversations: list, cap: int) -> dict:
    """Greedy replies to each conversation's first user turn: stop rate, and exact match / parse rate of
    the write-this-function turns."""
    cfg, tok = model.model_cfg, model.tokenizer
    cap = min(cap, cfg.block_size // 2)
    prompts, asks = [], []
    for c in conversations:
        first = c["messages"][:next(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant") + 1]
        ids = template.render_prompt(tok, first[:-1])
        room = cfg.block_size - cap
        if len(ids) > room:  # cut from the left, keeping the opening <|endoftext|>
            ids = np.concatenate([ids[:1], ids[len(ids) - room + 1:]])
        prompts.append(ids)
        asks.append((first[-2]["content"], first[-1]["content"]))
    stopped, write, exact, parsed = 0, 0, 0, 0
    for start in range(0, len(prompts), 32):
        new = sampling.generate(model.params, cfg, prompts[start:start + 32], cap, temperature=0.0,
                                end_token=tok.end_id, pad_multiple=32)
        for (question, answer), tokens in zip(asks[start:start + 32], new):
            stopped += len(tokens) < cap
            if kind_of(question) == "write":
                reply = tok.decode(tokens)
                write += 1
                exact += reply.rstrip() == answer.rstrip()
                parsed += evaluate_lib.parses_as_python(question[len(WRITE):] + reply)
    return {"stop_rate": stopped / max(len(prompts), 1), "replies": len(prompts), "cap": cap,
            "exact_match": exact / write if write else float("nan"),
            "parse_rate": parsed / write if write else float("nan"), "write_turns": write}


def preference_accuracy(model: Model, pairs: list) -> dict:
    arrays, skipped = chat_data.encode_preferences(model.tokenizer, pairs, model.model_cfg.block_size)
    chosen = chat_data.reference_logps(model.params, model.model_cfg, arrays["chosen_tokens"],
                                       arrays["chosen_weights"])
    rejected = chat_data.reference_logps(model.params, model.model_cfg, arrays["rejected_tokens"],
                                         arrays["rejected_weights"])
    return {"preference_accuracy": float(np.mean(chosen > rejected)) if len(chosen) else float("nan"),
            "pairs": int(len(chosen)), "pairs_skipped": int(skipped),
            "chosen_logp": float(np.mean(chosen)) if len(chosen) else float("nan"),
            "rejected_logp": float(np.mean(rejected)) if len(chosen) else float("nan")}


def breadth(model: Model, base_config: dict, batches: int) -> dict:
    """Bits per byte on the pretraining corpus's validation split (`gptlab.evaluate.lm_metrics`)."""
    data_cfg = evaluate_lib.data_config(base_config, {"eval_split": "validation"})
    config = config_dict.ConfigDict({"num_batches": batches})
    out = evaluate_lib.lm_metrics(model, data_cfg, config, log=lambda *_: None)
    return {"bits_per_byte": out["bits_per_byte"], "breadth_loss": out["loss"], "breadth_bytes": out["bytes"]}


def samples(model: Model, prompts: list, cap: int) -> list:
    """The same prompts answered greedily, two turns each: [[(user, reply, ended by itself), ...], ...]."""
    out = []
    for turns in prompts:
        chat = session.ChatSession(model.params, model.model_cfg, model.tokenizer, max_new_tokens=cap,
                                   temperature=0.0, top_k=0)
        out.append([[text, *chat.reply(text)] for text in turns])
    return out


def validate(run_dir, card: dict) -> dict:
    """Preference accuracy on the first `pairs` VALIDATION pairs: what DPO's learning rate is chosen by."""
    out = preference_accuracy(load(run_dir), test_pairs(card["pairs"], "validation"))
    return {"validation_preference_accuracy": out["preference_accuracy"], "validation_pairs": out["pairs"]}


def measure(run_dir, base_config: dict, card: dict, split: str = "test") -> dict:
    """Everything the report card says about one run's last checkpoint (see the module docstring)."""
    start = time.perf_counter()
    model = load(run_dir)
    conversations = test_conversations(card["conversations"], split)
    out = {"step": model.step, "split": split,
           "assistant_loss": chat_evaluate.assistant_loss(model.params, model.model_cfg, model.tokenizer,
                                                          conversations),
           "conversations": len(conversations)}
    out.update(replies(model, conversations, card["cap"]))
    out.update(preference_accuracy(model, test_pairs(card["pairs"], split)))
    if split == "test":
        out.update(breadth(model, base_config, card["breadth_batches"]))
        out["samples"] = samples(model, sample_prompts(conversations), card["cap"])
    out["measure_seconds"] = round(time.perf_counter() - start, 1)
    return out
