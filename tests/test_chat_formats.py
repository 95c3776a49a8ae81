"""Conversation and preference files: accepted formats, one-line errors naming the line, stable splits;
the embedded chat data stays inside the held-out packages."""
import json

import pytest

from gptlab.chat import corpus, formats
from gptlab.data import held_out
from gptlab.errors import UserError

GOOD_CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("bad, says", [
    ("{not json", "not valid JSON"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ({"messages": []}, "non-empty list"),
    ({"conversation": []}, "needs a \"messages\" list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "split": "dev"},
     "\"split\" is 'dev'"),
])
def test_a_bad_conversation_line_stops_with_the_file_and_line(tmp_path, bad, says):
    path = write(tmp_path / "chat.jsonl", [GOOD_CHAT, "", bad, GOOD_CHAT])
    with pytest.raises(UserError) as error:
        formats.read_jsonl(path, "chat")
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and says in message and "\n" not in message


@pytest.mark.parametrize("bad, says", [
    ({"prompt": "q", "chosen": "a"}, "needs \"prompt\", \"chosen\" and \"rejected\""),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "\"prompt\" is empty"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "\"rejected\" must be a non-empty string"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant turn"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role 'robot'"),
])
def test_a_bad_preference_line_stops_with_the_file_and_line(tmp_path, bad, says):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "pairs.jsonl", [good, bad])
    with pytest.raises(UserError) as error:
        formats.read_jsonl(path, "dpo")
    assert str(error.value).startswith(f"{path}:2: ") and says in str(error.value)


def test_trl_preference_formats_are_read_alike(tmp_path):
    lines = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},  # standard
        {"prompt": [{"role": "user", "content": "What is 2+2?"}],  # conversational
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    ]
    a, b = formats.read_jsonl(write(tmp_path / "p.jsonl", lines), "dpo")
    for key in ("prompt", "chosen", "rejected"):
        assert a[key] == b[key]
    assert a["prompt"] == [{"role": "user", "content": "What is 2+2?"}] and a["chosen"] == "4"


def test_splits_come_from_a_stable_hash_or_the_line_itself(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(300)]
    lines[0]["split"] = "test"
    records = formats.read_jsonl(write(tmp_path / "c.jsonl", lines), "chat")
    again = formats.read_jsonl(write(tmp_path / "d.jsonl", lines), "chat")
    assert [r["split"] for r in records] == [r["split"] for r in again]  # no dependence on path or order
    assert records[0]["split"] == "test"
    counts = {s: sum(r["split"] == s for r in records) for s in formats.SPLITS}
    assert 200 < counts["train"] < 280 and counts["validation"] > 10 and counts["test"] > 10


def test_embedded_chat_data_reads_only_held_out_files_and_pairs_differ():
    functions = corpus.functions()
    assert functions and all(held_out.is_held_out(f["path"]) for f in functions)
    train, test = corpus.conversations("train"), corpus.conversations("test")
    assert {c["kind"] for c in train} == {"write", "explain", "which_module"}
    assert any(c["messages"][0]["role"] == "system" for c in train)
    assert all(sum(m["role"] == "assistant" for m in c["messages"]) == 2 for c in train)  # with a follow-up
    for c in train[:200]:
        formats.check_messages(c["messages"], "embedded")
    # A function's block lies in one split: no test question is asked in training.
    asked = lambda convs: {c["messages"][-4]["content"] for c in convs}
    assert not asked(train) & asked(test)
    pairs = corpus.preferences("validation")
    assert pairs and all(p["chosen"].strip() != p["rejected"].strip() for p in pairs)
    assert {p["kind"] for p in pairs} == {"write", "explain", "which_module"}
