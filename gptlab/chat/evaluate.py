"""What a chat stage is measured by: assistant-token loss and stop rate on held-out conversations.

- assistant-token loss: the mean next-token loss on assistant text and each
  assistant turn's <|end|> (the chat template's mask), as in training's eval_loss.
- stop rate: the share of replies, sampled greedily to the first user turn of
  each conversation, that end with <|end|> by themselves within `cap` tokens.
  Only conversations whose prompt leaves room for `cap` tokens in the context
  are asked, so a reply is never cut by the window.
"""
import jax
import numpy as np

from gptlab import model as model_lib
from gptlab import sampling
from gptlab import steps as steps_lib
from gptlab.chat import data as chat_data
from gptlab.chat import template


def assistant_loss(params, cfg: model_lib.GPTConfig, tokenizer, conversations: list, batch_size: int = 32) -> float:
    """Mean loss per assistant token (and closing <|end|>) over `conversations` cut to the context."""
    arrays, _ = chat_data.encode_conversations(tokenizer, conversations, cfg.block_size)
    step = jax.jit(steps_lib.make_eval_step(steps_lib.lm_loss_fn(model_lib.GPT(cfg))))
    total, count = 0.0, 0.0
    for start in range(0, len(arrays["tokens"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
        pad = batch_size - len(batch["tokens"])  # one compiled shape; padding rows weigh nothing
        batch = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}
        out = jax.device_get(step(params, batch))
        total, count = total + float(out["loss_sum"]), count + float(out["count"])
    return total / max(count, 1.0)


def stop_rate(params, cfg: model_lib.GPTConfig, tokenizer, conversations: list, cap: int = 64,
              limit: int = 200) -> tuple:
    """(share of greedy replies ending with <|end|> within `cap` tokens, replies asked, [(prompt, reply)])."""
    prompts, asked = [], []
    for c in conversations:
        first = c["messages"][:next(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant")]
        ids = template.render_prompt(tokenizer, first)
        if len(ids) + cap <= cfg.block_size:
            prompts.append(ids)
            asked.append(first)
        if len(prompts) == limit:
            break
    if not prompts:
        return float("nan"), 0, []
    stopped, samples = 0, []
    for start in range(0, len(prompts), 32):
        new = sampling.generate(params, cfg, prompts[start:start + 32], cap, temperature=0.0,
                                end_token=tokenizer.end_id)
        for messages, tokens in zip(asked[start:start + 32], new):
            stopped += len(tokens) < cap
            samples.append((messages[-1]["content"], tokenizer.decode(tokens)))
    return stopped / len(prompts), len(prompts), samples
