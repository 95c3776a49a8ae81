"""Catalog datasets offline, SentencePiece and GPT-2 BPE tokenizers, the token cache, the Shakespeare presets."""
import base64
import hashlib
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import FULL, REPO, TEST_DATA, needs, needs_file, refuse_network, tiny_config
from configs import pretrain as pretrain_config
from gptlab import checkpoint as checkpoint_lib
from gptlab import model as model_lib
from gptlab import perf
from gptlab import tokenizers, train
from gptlab.data import catalog, pipeline, token_cache
from gptlab.errors import UserError

SHAKESPEARE_DIR = TEST_DATA / "tinyshakespeare"  # never copied into the repository
needs_shakespeare = pytest.mark.skipif(not FULL and not (SHAKESPEARE_DIR / "input.txt").is_file(),
                                       reason=f"the offline Tiny Shakespeare file is not at {SHAKESPEARE_DIR}")


def shakespeare_config(data_dir, preset="tiny", **overrides):
    config = pretrain_config.get_config(preset) if preset != "tiny" else tiny_config(data_dir)
    config.data.data_dir = data_dir
    config.data.manual_dir = str(SHAKESPEARE_DIR)
    config.checkpoint.async_save = False
    if preset == "tiny":
        config.data.dataset, config.data.tokenizer, config.data.include, config.data.exclude = (
            "tiny_shakespeare", "char", (), ())
    for dotted, value in overrides.items():
        group, field = dotted.split("__")
        setattr(config[group], field, value)
    return config


@pytest.fixture(scope="module")
def shakespeare(data_dir):
    """The real TFDS `tiny_shakespeare` builder, prepared from ../shared/data with the network disabled."""
    needs_file(SHAKESPEARE_DIR / "input.txt")
    needs("tensorflow", "tf")  # the tiny_shakespeare builder reads its file with tf.io.gfile
    with pytest.MonkeyPatch.context() as monkeypatch:
        refuse_network(monkeypatch)
        builder = pipeline.prepare(shakespeare_config(data_dir).data)
    return builder


def test_tiny_shakespeare_catalog_builder_prepares_offline_with_the_expected_splits(shakespeare):
    assert shakespeare.info.full_name == "tiny_shakespeare/1.0.0"
    assert shakespeare.info.file_format.value == "array_record"  # read through tfds.data_source
    texts = {split: list(pipeline.read_texts(shakespeare, split, "text"))
             for split in ("train", "validation", "test", "validation+test")}
    assert [len(t) for t in texts["train"]] == [1_003_854]
    assert [len(t) for t in texts["validation"]] == [55_770] and [len(t) for t in texts["test"]] == [55_770]
    source = (SHAKESPEARE_DIR / "input.txt").read_text()
    assert texts["train"][0] == source[:1_003_854] and texts["train"][0].startswith("First Citizen:")
    # The Shakespeare presets evaluate on validation+test: nanoGPT's validation data, the last 10%.
    assert "".join(texts["validation+test"]) == source[1_003_854:]


def test_tensorflow_sees_no_accelerator(shakespeare):
    tf = catalog.import_tensorflow()  # preparing tiny_shakespeare needed and imported it
    assert tf is not None and "tensorflow" in sys.modules
    assert {d.device_type for d in tf.config.get_visible_devices()} == {"CPU"}
    assert {d.device_type for d in tf.config.list_logical_devices()} == {"CPU"}

    class FakeConfig:  # a machine with a GPU and a TPU: only the CPU may stay visible
        def __init__(self):
            self.visible = None

        def list_physical_devices(self):
            return [tf.config.PhysicalDevice("/physical_device:CPU:0", "CPU"),
                    tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"),
                    tf.config.PhysicalDevice("/physical_device:TPU:0", "TPU")]

        def set_visible_devices(self, devices, device_type=None):
            self.visible = (devices, device_type)

    fake = type("FakeTF", (), {"config": FakeConfig()})()
    catalog.hide_accelerators(fake)
    devices, device_type = fake.config.visible
    assert device_type is None and [d.device_type for d in devices] == ["CPU"]


@pytest.mark.slow
def test_tensorflow_is_only_needed_to_prepare_a_catalog_dataset(shakespeare, tmp_path):
    """Without the `tf` extra, a prepared dataset still reads; preparing one says how to install it."""
    script = textwrap.dedent(f"""
        import importlib.machinery
        import sys

        find_spec = importlib.machinery.PathFinder.find_spec  # as if the tf extra were not installed:
        hidden = lambda cls, name, path=None, target=None: (
            None if name.split(".")[0] == "tensorflow" else find_spec(name, path, target))
        importlib.machinery.PathFinder.find_spec = classmethod(hidden)
        sys.path.insert(0, {str(REPO)!r})
        from configs import pretrain
        from gptlab.data import pipeline
        from gptlab.errors import UserError
        config = pretrain.get_config("tiny")
        config.data.dataset, config.data.include, config.data.exclude = "tiny_shakespeare", (), ()
        config.data.data_dir = {shakespeare.data_dir_root.as_posix()!r}
        builder = pipeline.prepare(config.data)
        print("read", len(next(pipeline.read_texts(builder, "train", "text"))))
        config.data.data_dir, config.data.manual_dir = {str(tmp_path / "fresh")!r}, {str(SHAKESPEARE_DIR)!r}
        try:
            pipeline.prepare(config.data)
        except UserError as e:
            print("error", e)
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "read 1003854" in lines and "tensorflow imported: False" in lines
    error = next(line for line in lines if line.startswith("error"))
    assert "needs TensorFlow" in error and 'pip install -e ".[tf]"' in error


def test_a_catalog_dataset_neither_prepared_nor_downloadable_names_the_file_and_the_manual_dir(tmp_path, monkeypatch):
    probes = []

    def offline(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    config = shakespeare_config(str(tmp_path / "tfds"), data__manual_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError) as error:
        pipeline.prepare(config.data)
    message = str(error.value)
    # No minutes of download retries: one short probe of the file's host, then the error.
    assert probes == [(("raw.githubusercontent.com", 443), 5.0)]
    assert "\n" not in message and "put input.txt (1,115,394 bytes" in message
    assert f"into {tmp_path / 'empty'}" in message and "raw.githubusercontent.com/karpathy/char-rnn" in message


@pytest.fixture(scope="module")
def shakespeare_bpe(shakespeare, tmp_path_factory):
    """A BPE SentencePiece tokenizer trained on the train split and stored in a workdir."""
    workdir = tmp_path_factory.mktemp("spm_run")
    config = shakespeare_config(str(shakespeare.data_dir_root), data__tokenizer="sentencepiece",
                                data__sentencepiece_vocab_size=512)
    tok = tokenizers.load_or_build(config.data, lambda: pipeline.read_texts(shakespeare, "train", "text"),
                                   workdir, log=lambda _: None)
    return tok, workdir, config


def test_sentencepiece_trains_on_the_train_split_and_is_restored_from_the_workdir(shakespeare_bpe):
    tok, workdir, config = shakespeare_bpe
    assert tok.kind == "sentencepiece" and tok.model_type == "bpe" and tok.vocab_size == 512
    assert tok.special_tokens == {tokenizers.EOT: tok.eot_id}
    ids = tok.encode("To be, or not to be: that is the question.\n")
    assert len(ids) < 25 and tok.decode(ids) == "To be, or not to be: that is the question.\n"  # merges learned
    model_file = workdir / tokenizers.SENTENCEPIECE_MODEL
    import sentencepiece as spm
    assert spm.SentencePieceProcessor(model_file=str(model_file)).encode("Romeo") == tok.encode("Romeo").tolist()

    def must_not_train():
        raise AssertionError("the stored tokenizer should have been reused")

    logged = []
    again = tokenizers.load_or_build(config.data, must_not_train, workdir, log=logged.append)
    assert "reusing" in logged[0] and again.model_proto == tok.model_proto
    restored = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
    assert tokenizers.fingerprint(restored) == tokenizers.fingerprint(tok)
    # A different vocabulary size in the config is a different tokenizer: refused for a trained run.
    with pytest.raises(UserError, match=r"was trained with the sentencepiece \(bpe, vocab 512\) tokenizer but the "
                                        r"config asks for .*sentencepiece_vocab_size=1024"):
        tokenizers.check_matches(tok, shakespeare_config(None, data__tokenizer="sentencepiece",
                                                         data__sentencepiece_vocab_size=1024).data, "the run")


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_sentencepiece_round_trips_any_text_exactly(shakespeare_bpe, text):
    tok = shakespeare_bpe[0]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids.tolist()
    assert [a.tolist() for a in tok.encode_batch([text, "x"])] == [ids.tolist(), tok.encode("x").tolist()]


def test_sentencepiece_unigram_and_bad_vocab_sizes(shakespeare):
    text = next(pipeline.read_texts(shakespeare, "train", "text"))[:200_000]
    tok = tokenizers.SentencePieceTokenizer.train([text], "unigram", 400, max_chars=10**9)
    sample = "  MENENIUS:\n\tWhat work's, my countrymen, in hand? ▁ naïve 🙂\r\n"
    assert tok.model_type == "unigram" and tok.vocab_size == 400 and tok.decode(tok.encode(sample)) == sample
    with pytest.raises(UserError, match="sentencepiece_vocab_size"):
        tokenizers.SentencePieceTokenizer.train([text[:2000]], "unigram", 5000, max_chars=10**9)


def test_sentencepiece_run_stores_its_model_and_refuses_another_tokenizer_on_resume(make_config, tmp_path):
    def config(num_steps, **overrides):
        return make_config(train__num_steps=num_steps, train__eval_every=2, train__checkpoint_every=2,
                           data__tokenizer="sentencepiece", data__sentencepiece_vocab_size=400,
                           data__cache_dir=str(tmp_path / "cache"), **overrides)

    train.train_and_evaluate(config(2), tmp_path / "run")
    stored = (tmp_path / "run" / tokenizers.SENTENCEPIECE_MODEL).read_bytes()
    ckpts = checkpoint_lib.Checkpoints(tmp_path / "run" / "checkpoints")
    spec = ckpts.read_json(2, "tokenizer")
    ckpts.close()
    assert base64.b64decode(spec["model"]) == stored  # the checkpoint carries the very model file
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["vocab_size"] == 400
    with pytest.raises(UserError, match="trained with the sentencepiece .bpe, vocab 400. tokenizer"):
        train.train_and_evaluate(config(6, data__sentencepiece_type="unigram"), tmp_path / "run")


def _fake_gpt2_encoding(path):
    """A tiktoken file shaped like GPT-2's (50,256 ranks: the bytes, then byte pairs), not GPT-2's."""
    tokens = [bytes([b]) for b in range(256)]
    letters = b"etaoinshrdlucmfwypvbgkjqxz ETAOINSHRDLUCMFWYPVBGKJQXZ"
    tokens += [bytes([a, b]) for a in letters for b in letters]
    seen = set(tokens)
    tokens += [bytes([a, b]) for a in range(256) for b in range(256) if bytes([a, b]) not in seen]
    tokens = tokens[:tokenizers.GPT2_NUM_RANKS]
    content = b"".join(base64.b64encode(t) + b" " + str(rank).encode() + b"\n" for rank, t in enumerate(tokens))
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def test_gpt2_tokenizer_needs_its_local_encoding_file_and_says_where_to_get_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(tokenizers, "_tiktoken_cache_candidates", lambda: [tmp_path / "no-cache"])
    config = tiny_config(None, data__tokenizer="gpt2")
    with pytest.raises(UserError, match=r"needs GPT-2's BPE encoding file.*r50k_base\.tiktoken.*"
                                        r"--config\.data\.gpt2_encoding_file="):
        tokenizers.build(config.data, lambda: [])
    config.data.gpt2_encoding_file = str(tmp_path / "missing.tiktoken")
    with pytest.raises(UserError, match="missing.tiktoken does not exist"):
        tokenizers.build(config.data, lambda: [])
    fake = tmp_path / "fake.tiktoken"
    fake_sha256 = _fake_gpt2_encoding(fake)
    config.data.gpt2_encoding_file = str(fake)
    with pytest.raises(UserError, match="is not GPT-2's BPE encoding"):
        tokenizers.build(config.data, lambda: [])

    monkeypatch.setattr(tokenizers, "GPT2_ENCODING_SHA256", fake_sha256)  # accept the stand-in file
    tok = tokenizers.build(config.data, lambda: [])
    assert tok.kind == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    text = "the rest is silence <|endoftext|> ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot_id not in ids.tolist()  # the literal string is plain text
    assert tok.encode("ee").tolist() == [256]  # ranks come from the file: "ee" is its first pair
    restored = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))  # finds the file it was built from
    assert restored.encode(text).tolist() == ids.tolist()
    assert tokenizers.fingerprint(restored) == tokenizers.fingerprint(tok)


GPT2_ENCODING = TEST_DATA / "gpt2" / "r50k_base.tiktoken"  # or GPTLAB_GPT2_ENCODING, or tiktoken's own cache


def _whisper_gpt2_encoding():
    """GPT-2's encoding file as the openai-whisper package ships it (test-full extra), found without importing it."""
    spec = importlib.util.find_spec("whisper")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return str(pathlib.Path(locations[0]) / "assets" / "gpt2.tiktoken") if locations else None


def _gpt2_encoding_file():
    """GPT-2's real encoding file: GPTLAB_GPT2_ENCODING, the offline test data, openai-whisper's copy, or tiktoken's cache."""
    candidates = [os.environ.get("GPTLAB_GPT2_ENCODING"), str(GPT2_ENCODING), _whisper_gpt2_encoding()] + [
        str(p) for p in tokenizers._tiktoken_cache_candidates()]
    return next((p for p in candidates if p and os.path.isfile(p)), None)


def test_gpt2_tokenizer_gives_gpt2s_ids():
    found = _gpt2_encoding_file()
    needs_file(pathlib.Path(found) if found else GPT2_ENCODING)
    tok = tokenizers.GPT2Tokenizer(found)
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.decode([15496, 995, 50256]) == "Hello world"


def _cache(shakespeare, directory, tokenizer, log=lambda _: None, split="train"):
    return token_cache.load_or_build(directory, shakespeare, split, "text", tokenizer,
                                     lambda: pipeline.read_texts(shakespeare, split, "text"), log)


def test_token_cache_is_reused_without_retokenising_and_rebuilt_when_damaged(shakespeare, tmp_path, monkeypatch):
    text = next(pipeline.read_texts(shakespeare, "train", "text"))
    char = tokenizers.CharTokenizer.train([text])
    tokens, stats = _cache(shakespeare, tmp_path, char)
    assert not stats["cached"] and stats["tokens_per_sec"] > 0
    expected = np.concatenate([char.encode(text), [char.eot_id]])
    np.testing.assert_array_equal(tokens, expected)
    meta = json.loads(next(tmp_path.rglob("train-*.json")).read_text())
    assert meta["num_tokens"] == 1_003_855 and meta["source"]["tokenizer"] == "char"

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizers.CharTokenizer, "encode_batch", no_tokenising)
        patch.setattr(tokenizers.CharTokenizer, "encode", no_tokenising)
        again, stats = _cache(shakespeare, tmp_path, tokenizers.from_json(char.to_json()))
    assert stats["cached"] and isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, expected)

    bin_path = next(tmp_path.rglob("train-*.bin"))
    data = bytearray(bin_path.read_bytes())
    data[1000] ^= 0xFF  # one damaged byte, same size
    bin_path.write_bytes(bytes(data))
    logged = []
    repaired, stats = _cache(shakespeare, tmp_path, char, log=logged.append)
    assert not stats["cached"] and "sha256 mismatch" in logged[0]
    np.testing.assert_array_equal(repaired, expected)
    with open(bin_path, "r+b") as f:  # truncated by a crash or a full disk
        f.truncate(100)
    logged = []
    repaired, stats = _cache(shakespeare, tmp_path, char, log=logged.append)
    assert not stats["cached"] and "damaged" in logged[0]
    np.testing.assert_array_equal(repaired, expected)


def test_token_cache_is_keyed_by_tokenizer_and_split(shakespeare, tmp_path):
    text = next(pipeline.read_texts(shakespeare, "train", "text"))
    char = tokenizers.CharTokenizer.train([text])
    _cache(shakespeare, tmp_path, char)
    byte_tokens, stats = _cache(shakespeare, tmp_path, tokenizers.ByteTokenizer())
    assert not stats["cached"] and byte_tokens.dtype == np.uint16 and len(byte_tokens) == 1_003_855
    smaller = tokenizers.CharTokenizer.train([text[:1000]])  # another vocabulary: other ids
    _, stats = _cache(shakespeare, tmp_path, smaller)
    assert not stats["cached"]
    _, stats = _cache(shakespeare, tmp_path, char, split="validation")
    assert not stats["cached"] and len(list(tmp_path.rglob("*.bin"))) == 4
    _, stats = _cache(shakespeare, tmp_path, char)
    assert stats["cached"]


def test_shifted_windows_start_anywhere_and_are_a_function_of_position():
    tokens = np.arange(1000, dtype=np.uint16)
    a = pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=3, shift=True)
    assert a.num_windows == 99  # room for an offset of up to 9
    batches = [next(a)["tokens"] for _ in range(100)]  # 400 windows: 4 epochs
    windows = np.concatenate(batches)
    assert all(np.array_equal(w[1:] - w[:-1], np.ones(10)) for w in windows)
    offsets = {int(w[0]) % 10 for w in windows}
    assert len(offsets) > 1  # not all on one grid
    b = pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=3, shift=True)
    b.restore(json.loads(json.dumps(a.state())) | {"position": 4 * 60})
    np.testing.assert_array_equal(next(b)["tokens"], batches[60])
    with pytest.raises(UserError, match="shift"):
        pipeline.WindowBatches(tokens, seq_len=10, batch_size=4, seed=3).restore(a.state())


def test_shakespeare_char_is_nanogpts_baby_gpt():
    config = pretrain_config.get_config("shakespeare_char")
    model_cfg = model_lib.GPTConfig.from_config(perf.resolve_model_fields(config.model), vocab_size=67)  # 65 chars + 2
    params = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
    assert round(model_lib.count_params(params) / 1e6, 2) == 10.65  # nanoGPT: "number of parameters: 10.65M"
    assert (config.data.batch_size, config.model.block_size, config.model.dropout) == (64, 256, 0.2)
    assert (config.train.num_steps, config.train.eval_every, config.train.eval_batches) == (5000, 250, 200)
    assert (config.optimizer.learning_rate, config.optimizer.min_learning_rate, config.optimizer.warmup_steps,
            config.optimizer.b2) == (1e-3, 1e-4, 100, 0.99)


@pytest.mark.slow
@needs_shakespeare
def test_cpu_shakespeare_preset_trains_on_the_real_corpus(shakespeare, tmp_path):
    config = shakespeare_config(str(shakespeare.data_dir_root), preset="shakespeare_char_cpu",
                                train__num_steps=30, train__eval_every=30, train__eval_batches=2,
                                train__log_every=10, data__cache_dir=str(tmp_path / "cache"))
    final = train.train_and_evaluate(config, tmp_path / "run")
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["data"]["dataset"] == "tiny_shakespeare" and resolved["model"]["vocab_size"] == 67
    assert final["step"] == 30 and final["eval_loss"] < 3.7  # from ln(67) = 4.2
    assert json.loads((tmp_path / "run" / tokenizers.TOKENIZER_JSON).read_text())["kind"] == "char"
