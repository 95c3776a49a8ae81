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

_WORKDIR, _STEP = cli.define_checkpoint_flags("chat with (a chat fine-tuning run)")
_SYSTEM = flags.DEFINE_string("system", None, "A system prompt that opens every conversation.")
_MAX_NEW_TOKENS, _TEMPERATURE, _TOP_K, _TOP_P, _SEED = cli.define_sampling_flags(256, 0.7, 50)


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
