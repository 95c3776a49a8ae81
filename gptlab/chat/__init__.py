"""From base model to assistant: conversations, the chat template, preference tuning.

- `template`: the turn-boundary tokens every gptlab tokenizer gains for chat
  (`ChatTokenizer`), rendering a conversation to tokens and its loss mask.
- `formats`: the JSONL formats read from disk (messages for SFT, TRL's
  prompt/chosen/rejected for preference tuning), checked line by line.
- `corpus`: the embedded chat and preference data, built offline from the
  held-out standard-library packages.
- `data`: batches for `finetune.task=chat` and `finetune.task=dpo`.
- `vocab`: growing a pretrained model's embedding (and untied head) for the new tokens.
- `dpo`: the DPO (and IPO) loss, one pure function inside the shared train step;
  `reference`: the frozen starting checkpoint whose log-probabilities it compares to.
- `session`: a multi-turn conversation with the key/value cache (experiments/chat.py).
- `evaluate`: assistant-token loss and stop rate on held-out conversations.
"""
