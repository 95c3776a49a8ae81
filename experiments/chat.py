"""Chat with a model fine-tuned for chat (finetune task `chat` or `dpo`).

    python -m experiments.chat --workdir=/tmp/gptlab/chat [--step=best] [--system="Be brief."]
    printf 'Which module defines `getLogger`?\\nWhat does it do?\\n' | python -m experiments.chat --workdir=RUN

On a terminal: type a turn, the reply streams as it is sampled; `/reset` starts a
new conversation (keeping --system), `/quit` or end of input (Ctrl-D) leaves.
With stdin not a terminal: every input line is one user turn of one conversation
and gets exactly one output line, the reply (newlines in it written as `\\n`);
it exits at end of input. The model's description goes to stderr.
A reply ends at the end-of-turn token or after --max_new_tokens tokens.
"""
import sys

from absl import flags

from gptlab import cli, convert
from gptlab.chat import session

_WORKDIR = flags.DEFINE_string("workdir", None, "The chat fine-tuning workdir to load.", required=True)
_STEP = flags.DEFINE_string("step", None, "Checkpoint step to load, or 'best' (by validation); default the latest.")
_SYSTEM = flags.DEFINE_string("system", None, "A system prompt that opens every conversation.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Softmax temperature; 0 is greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Sample from the k most likely tokens only; 0 disables.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the most likely tokens holding this probability; 1 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed and turns give the same replies.")


def main():
    loaded = convert.load_workdir(_WORKDIR.value, _STEP.value)
    cfg = loaded.model_cfg
    chat = session.ChatSession(loaded.params, cfg, loaded.tokenizer, system=_SYSTEM.value,
                               max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
    interactive = sys.stdin.isatty()
    print(f"loaded step {loaded.step} from {loaded.directory} ({cfg.n_layer} layers, {cfg.n_embd} wide, context "
          f"{cfg.block_size}, {loaded.tokenizer.kind} tokenizer)"
          + ("; /reset starts over, /quit or Ctrl-D leaves" if interactive else ""), file=sys.stderr, flush=True)
    if not interactive:
        for line in sys.stdin:
            text = line.rstrip("\n")
            answer = chat.reply(text)[0] if text.strip() else ""
            print(answer.replace("\\", "\\\\").replace("\n", "\\n"), flush=True)
        return
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            chat.reset()
            print("(new conversation)")
            continue
        if not text.strip():
            continue
        print("assistant> ", end="", flush=True)
        _, stopped = chat.reply(text, on_text=lambda piece: print(piece, end="", flush=True))
        print("" if stopped else f"\n(cut at {_MAX_NEW_TOKENS.value} tokens)", flush=True)


if __name__ == "__main__":
    cli.run(main)
