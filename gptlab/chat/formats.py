"""Conversation and preference files: JSONL in the formats the ecosystem uses, checked line by line.

Chat SFT (`finetune.task=chat`), one conversation per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Preference tuning (`finetune.task=dpo`), TRL's preference format:

    {"prompt": "..." or [messages], "chosen": "..." or [{"role": "assistant", ...}],
     "rejected": "..." or [{"role": "assistant", ...}]}

A string prompt is one user turn. Roles are system, user and assistant; every
content is a non-empty string; a conversation has at least one assistant turn
(that is what SFT learns). The first bad line stops the run with a UserError
naming the file, the line and what to fix, before anything is trained. Blank
lines are skipped. An optional "split" key ("train", "validation", "test") puts
a line in that split; otherwise `split_of` assigns one by a stable hash.
"""
import json
import pathlib

from gptlab.data import held_out
from gptlab.errors import UserError

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")


def _where(path, line: int) -> str:
    return f"{path}:{line}"


def check_messages(messages, where: str, need_assistant: bool = True) -> list:
    """The messages as a list of {"role", "content"} dicts; a UserError naming `where` if malformed."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        "objects: fix or remove that line")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: message {i} must be an object with \"role\" and \"content\": fix or remove "
                            "that line")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: message {i} ({role}) has empty or non-text content: give it some text or "
                            "remove the message")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to learn: "
                        "add one or remove that line")
    return out


def _response(value, key: str, where: str) -> str:
    """chosen/rejected: a string, or one assistant message (alone in a list, or bare)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise UserError(f"{where}: \"{key}\" must be one assistant message (role \"assistant\"), "
                            f"not role {value.get('role')!r}: fix that line")
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: \"{key}\" must be a non-empty string or one assistant message: fix that line")
    return value


def parse_preference(record, where: str) -> dict:
    """{"prompt": messages, "chosen": text, "rejected": text} from one TRL preference record."""
    if not isinstance(record, dict) or any(k not in record for k in ("prompt", "chosen", "rejected")):
        raise UserError(f"{where}: a preference line needs \"prompt\", \"chosen\" and \"rejected\": fix that line")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: \"prompt\" is empty: give the user's request")
        prompt = [{"role": "user", "content": prompt}]
    prompt = check_messages(prompt, where, need_assistant=False)
    if prompt[-1]["role"] == "assistant":
        raise UserError(f"{where}: the prompt ends with an assistant turn; it must end with the user's turn that "
                        "chosen and rejected answer")
    return {"prompt": prompt, "chosen": _response(record["chosen"], "chosen", where),
            "rejected": _response(record["rejected"], "rejected", where)}


def parse_conversation(record, where: str) -> dict:
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where}: a conversation line needs a \"messages\" list (chat SFT format "
                        "{\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]}): fix that line")
    return {"messages": check_messages(record["messages"], where)}


def read_jsonl(path, kind: str) -> list:
    """Every record of a JSONL file of `kind` "chat" or "dpo", checked; each with "split" and "key" added."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={path} does not exist: give a JSONL file of "
                        f"{'conversations' if kind == 'chat' else 'preference pairs'}")
    parse = parse_conversation if kind == "chat" else parse_preference
    records = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines: U+2028 may sit in a string
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{_where(path, line)}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        where = _where(path, number)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): write one JSON object "
                            "per line") from None
        parsed = parse(record, where)
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise UserError(f"{where}: \"split\" is {split!r}: use one of {', '.join(SPLITS)} or leave it out")
        key = line.strip()
        parsed.update(split=split or split_of(key), key=key)
        records.append(parsed)
    if not records:
        raise UserError(f"data.path={path} holds no records: put one JSON object per line in it")
    return records


def split_of(key: str) -> str:
    """train, validation or test from a hash of the line's text (the held-out tasks' fractions):
    the same line lands in the same split on every machine and in every run."""
    return held_out.split_of(key)
