import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gptlab import tokenizers
from gptlab.data import corpora, pipeline
from gptlab.errors import UserError


def test_stdlib_builder_prepares_offline_with_deterministic_path_splits(make_config, no_network):
    data_cfg = make_config().data
    builder = pipeline.prepare(data_cfg)
    assert builder.info.full_name.startswith(f"python_stdlib/py{corpora.python_version()}")
    paths = {split: [ex["path"].decode() for ex in builder.as_data_source(split=split)]
             for split in ("train", "validation")}
    assert paths["train"] and paths["validation"]
    assert not set(paths["train"]) & set(paths["validation"])
    for split, names in paths.items():
        assert all(corpora.split_of(p) == split for p in names)
        assert all(p[0] in "abc" and not p.startswith(("test/", "email/")) for p in names)
    text = next(iter(pipeline.read_texts(builder, "train", "text")))
    assert "def " in text or "import " in text


def test_include_and_exclude_hold_out_a_package(make_config, no_network):
    config = make_config(data__include=("email/*",), data__exclude=("email/mime/*",))
    builder = pipeline.prepare(config.data)
    names = [ex["path"].decode() for ex in builder.as_data_source(split="train")]
    assert names and all(n.startswith("email/") and not n.startswith("email/mime/") for n in names)
    assert pipeline.prepare(make_config().data).info.full_name != builder.info.full_name


def test_docstrings_corpus_is_the_prose_of_the_same_files_without_their_code(make_config, no_network):
    source = '''"""Module summary."""
import os


class A:
    """A class."""

    def f(self):
        """Method f.

            Indented detail.
        """
        return os.sep


def g():
    return 1
'''
    assert corpora.docstrings(source) == "Module summary.\n\nA class.\n\nMethod f.\n\nIndented detail."
    assert corpora.docstrings("def broken(:\n") == ""  # a file that does not parse has no prose
    config = make_config(data__dataset="python_stdlib_docstrings", data__include=("json/*",))
    builder = pipeline.prepare(config.data)
    assert builder.info.full_name.startswith("python_stdlib_docstrings/")
    examples = [ex for split in builder.info.splits for ex in builder.as_data_source(split=split)]
    code_builder = pipeline.prepare(make_config(data__include=("json/*",)).data)
    code = {ex["path"].decode(): ex["text"].decode() for split in code_builder.info.splits
            for ex in code_builder.as_data_source(split=split)}
    assert examples and {ex["path"].decode() for ex in examples} <= set(code)  # same files, same splits
    for ex in examples:
        path, text = ex["path"].decode(), ex["text"].decode()
        assert text == corpora.docstrings(code[path]) and len(text) < len(code[path])  # the prose, not the code
        assert corpora.split_of(path) in builder.info.splits


def test_empty_split_names_the_split_and_the_fix(make_config):
    config = make_config(data__include=("json/decoder.py",))  # one file: a train split only
    builder = pipeline.prepare(config.data)
    with pytest.raises(UserError, match="no examples in split 'validation'.*widen data.include"):
        list(pipeline.read_texts(builder, "validation", "text"))


def test_text_folder_builder_reads_a_users_files(tmp_path, make_config, no_network):
    folder = tmp_path / "notes"
    for i in range(60):
        (folder / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 3}" / f"note{i}.txt").write_text(f"note number {i}: ünïcode ✓\n")
    config = make_config(data__dataset="text_folder", data__text_dir=str(folder), data__include=(),
                         data__exclude=("sub2/*",))
    builder = pipeline.prepare(config.data)
    texts = list(pipeline.read_texts(builder, "train", "text"))
    assert 30 < len(texts) < 40 and all("✓" in t for t in texts)
    with pytest.raises(UserError, match="not a directory"):
        pipeline.make_builder(make_config(data__dataset="text_folder", data__text_dir=str(tmp_path / "no")).data)


def test_unknown_dataset_is_a_one_line_error(make_config):
    with pytest.raises(UserError, match="unknown data.dataset='no_such_dataset'"):
        pipeline.make_builder(make_config(data__dataset="no_such_dataset").data)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids < 256).all()
    assert tok.decode(ids) == text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_char_tokenizer_round_trips_text_from_its_vocabulary_and_reloads(text):
    tok = tokenizers.CharTokenizer.train([text])
    assert tok.decode(tok.encode(text)) == text
    again = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
    np.testing.assert_array_equal(again.encode(text), tok.encode(text))


def test_char_tokenizer_maps_unknown_characters_and_refuses_them_when_strict():
    tok = tokenizers.CharTokenizer.train(["abc"])
    assert tok.vocab_size == 5 and tok.encode("abz").tolist() == [2, 3, tokenizers.CharTokenizer.unk_id]
    with pytest.raises(UserError, match="not in the character vocabulary"):
        tok.encode("z", strict=True)


def test_documents_are_joined_with_end_of_text():
    tok = tokenizers.ByteTokenizer()
    stream = pipeline.tokenize_documents(["ab", "c"], tok)
    assert stream.tolist() == [97, 98, 256, 99, 256]


def test_batches_are_a_pure_function_of_seed_and_position():
    tokens = np.arange(1000, dtype=np.uint16)
    a = pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=3)
    first = [next(a)["tokens"] for _ in range(40)]  # 160 windows: crosses 2 epochs of 99
    b = pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=3)
    b.restore(json.loads(json.dumps(a.state())) | {"position": 4 * 25})
    np.testing.assert_array_equal(next(b)["tokens"], first[25])
    windows = np.concatenate(first[:24])  # within epoch 0: every window at most once
    assert len({tuple(w) for w in windows}) == len(windows)
    assert all(np.array_equal(w[1:] - w[:-1], np.ones(10)) for w in windows)  # contiguous next-token windows
    c = pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=4)
    assert not np.array_equal(next(c)["tokens"], first[0])


def test_each_process_reads_its_own_rows_of_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = next(pipeline.WindowBatches(tokens, 8, 8, seed=0))["tokens"]
    parts = [next(pipeline.WindowBatches(tokens, 8, 8, seed=0, process_index=i, process_count=4))["tokens"]
             for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_restoring_into_different_data_is_refused():
    a = pipeline.WindowBatches(np.arange(1000), 10, 4, seed=0)
    b = pipeline.WindowBatches(np.arange(2000), 10, 4, seed=0)
    with pytest.raises(UserError, match="num_windows.*changed since the run started"):
        b.restore(a.state())


def test_evaluation_batches_do_not_depend_on_the_runs_seed(make_config):
    """Runs that differ only in seed are scored on the same windows; their training batches differ."""
    config = make_config()
    one, two = (pipeline.Data(config.data, seq_len=32, seed=seed, log=lambda *_: None) for seed in (1, 2))
    for a, b in zip(one.eval_batches(3), two.eval_batches(3)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(next(one.train)["tokens"], next(two.train)["tokens"])


def test_fixed_batches_of_none_hold_every_example_once():
    from gptlab.data import supervised
    arrays = {"tokens": np.arange(11 * 3).reshape(11, 3), "weights": np.ones((11, 3))}
    batches = supervised.fixed_batches(arrays, 4, None, seed=0)
    assert len(batches) == 3  # 11 examples in batches of 4: the last padded with weight-0 rows
    real = [row[0] for b in batches for row, w in zip(b["tokens"], b["weights"]) if w.any()]
    assert sorted(real) == list(range(0, 33, 3))
    assert len(supervised.fixed_batches(arrays, 4, 2, seed=0)) == 2  # a number of batches: as before
