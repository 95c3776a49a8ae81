"""Hugging Face tokenizers for imported models: a tokenizer the test builds itself (no download)."""
import json


from conftest import needs
from gptlab import tokenizers as gptlab_tokenizers
from gptlab.hf_tokenizer import HFTokenizer
from configs import pretrain as pretrain_config

BASE_CONFIG = pretrain_config.get_config("small")  # what experiments.convert passes

hf_tokenizers = needs("tokenizers", "bench")
transformers = needs("transformers", "bench")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x): return x"},
            {"role": "assistant", "content": "It returns x."}, {"role": "user", "content": "Why?"}]


def build_tokenizer_dir(directory):
    """A byte-level BPE (Qwen2/Llama-3 style) trained here on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "It returns x. Be brief.", "héllo wörld"] * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_round_trip_and_chat_template_as_transformers_renders_it(tmp_path):
    directory = build_tokenizer_dir(tmp_path / "tok")
    ours = HFTokenizer.from_dir(directory)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                  eos_token="<|im_end|>")
    theirs.chat_template = CHATML
    for text in ["def f(x):\n    return x + 1\n", "héllo wörld, ünïcode 🙂", "  spaces\tand\ttabs  "]:
        ids = ours.encode(text)
        assert ids.tolist() == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert ours.eot_id == theirs.eos_token_id and ours.vocab_size == len(theirs)
    for generation in (True, False):
        rendered = ours.render_chat(MESSAGES, add_generation_prompt=generation)
        assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation)
    ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(ours.render_chat(MESSAGES)).tolist() == list(ids)  # special tokens in the text are matched
    # Stored with a run and read back (checkpoints and tokenizer.json hold the spec).
    restored = gptlab_tokenizers.from_json(json.loads(json.dumps(ours.to_json())))
    assert restored.encode("def f").tolist() == ours.encode("def f").tolist() and restored.chat_template == CHATML


def test_an_imported_llama_keeps_its_tokenizer_and_chats(tmp_path):
    needs("torch", "bench")
    from test_convert import hf_llama_model  # a tiny random LlamaForCausalLM saved offline

    from gptlab import convert
    from gptlab.chat import session

    hf_llama_model(tmp_path / "hf", vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=False)
    build_tokenizer_dir(tmp_path / "hf")
    convert.from_hf(str(tmp_path / "hf"), tmp_path / "run", BASE_CONFIG, log=lambda *_: None)
    loaded = convert.load_workdir(tmp_path / "run")
    assert isinstance(loaded.tokenizer, HFTokenizer) and loaded.config["data"]["tokenizer"] == "huggingface"
    chat = session.ChatSession(loaded.params, loaded.model_cfg, loaded.tokenizer, max_new_tokens=5, temperature=0)
    answer, _ = chat.reply("def f(x): return x")
    assert isinstance(answer, str) and chat.messages[-1]["role"] == "assistant"
