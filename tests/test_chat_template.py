"""The chat template: its tokens on every tokenizer, the assistant-only loss mask, truncation, empty batches."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import needs
from gptlab import tokenizers
from gptlab import steps as steps_lib
from gptlab.chat import template
from gptlab.model import GPT, GPTConfig, init_params

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Who?"},
    {"role": "assistant", "content": "Me."},
]


def byte_chat():
    return template.with_chat_tokens(tokenizers.ByteTokenizer())


def expected_layout(tok):
    """(ids, mask) written out by hand for CONVERSATION: mask 1 on assistant text and its <|end|> only."""
    ids, mask = [tok.eot_id], [0]
    for m in CONVERSATION:
        content = list(tok.encode(m["content"]))
        is_assistant = int(m["role"] == "assistant")
        ids += [tok.chat_ids[template.ROLES[m["role"]]]] + content + [tok.end_id]
        mask += [0] + [is_assistant] * len(content) + [is_assistant]
    return np.array(ids), np.array(mask)


def test_mask_covers_assistant_turns_and_their_end_of_turn_only():
    tok = byte_chat()
    ids, mask = template.render(tok, CONVERSATION)
    want_ids, want_mask = expected_layout(tok)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    # Read back: the masked tokens are exactly "Hello!<|end|>" and "Me.<|end|>".
    spans, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(int(token))
            if token == tok.end_id:
                spans.append(current)
                current = []
    assert [tok.decode(s[:-1]) for s in spans] == ["Hello!", "Me."] and all(s[-1] == tok.end_id for s in spans)
    assert not mask[ids == tok.chat_ids[template.ASSISTANT]].any()  # the opening role token is prompt
    assert not mask[:np.flatnonzero(ids == tok.chat_ids[template.ASSISTANT])[0]].any()  # system and user text


def test_weights_are_the_mask_shifted_to_targets_and_truncation_keeps_them_right():
    tok = byte_chat()
    ids, mask = template.render(tok, CONVERSATION)
    full_len = len(ids)
    tokens, weights = template.to_example(ids, mask, full_len + 5, tok.eot_id)  # padded
    np.testing.assert_array_equal(weights[:full_len - 1], mask[1:])
    assert not weights[full_len - 1:].any()
    for cut in range(2, full_len):  # every window length: weights[j] is the mask of the token tokens[j + 1]
        tokens, weights = template.to_example(ids, mask, cut, tok.eot_id)
        np.testing.assert_array_equal(tokens, ids[:cut + 1])
        np.testing.assert_array_equal(weights, mask[1:cut + 1])
    # A window that ends inside the first reply keeps its first tokens, without an <|end|>.
    first_reply = np.flatnonzero(mask)[0]
    tokens, weights = template.to_example(ids, mask, first_reply + 1, tok.eot_id)
    assert weights.sum() == 2 and tok.end_id not in tokens[1:][weights > 0]


def test_prompt_for_generation_ends_with_the_assistant_token():
    tok = byte_chat()
    prompt = template.render_prompt(tok, CONVERSATION[:2])
    assert prompt[0] == tok.eot_id and prompt[-1] == tok.chat_ids[template.ASSISTANT]
    assert tok.decode(prompt) == "Be brief.Hi"  # decode drops the special tokens


def test_every_tokenizer_gets_the_chat_tokens_after_its_vocabulary_and_reloads(tmp_path):
    needs("sentencepiece", "sentencepiece")
    text = "def f(x):\n    return x + 1\n" * 50 + "the quick brown fox jumps over a lazy dog\n" * 20
    bases = [tokenizers.ByteTokenizer(), tokenizers.CharTokenizer.train([text]),
             tokenizers.SentencePieceTokenizer.train([text], "bpe", 300, 10_000)]
    for base in bases:
        tok = template.with_chat_tokens(base)
        assert tok.vocab_size == base.vocab_size + 4
        assert sorted(tok.chat_ids.values()) == list(range(base.vocab_size, base.vocab_size + 4))
        assert tok.decode(tok.encode("return x")) == "return x"
        assert "<|end|>" not in tok.special_tokens or tok.encode("<|end|>").tolist() != [tok.end_id]  # text stays text
        restored = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
        assert isinstance(restored, template.ChatTokenizer) and restored.chat_ids == tok.chat_ids
        tokenizers.save(tok, tmp_path)  # a workdir's tokenizer.json (and a SentencePiece model)
        assert template.with_chat_tokens(tok) is tok

    class GPT2Like:  # GPT-2's numbers without its 1.6 MB encoding file
        kind, vocab_size, eot_id, special_tokens = "gpt2", 50257, 50256, {"<|endoftext|>": 50256}

    assert template.with_chat_tokens(GPT2Like()).chat_ids == {
        "<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}


def test_a_batch_without_assistant_tokens_contributes_nothing_and_never_nan():
    cfg = GPTConfig(vocab_size=261, block_size=16, n_layer=1, n_head=2, n_embd=16)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    loss_fn = jax.jit(steps_lib.lm_loss_fn(GPT(cfg)), static_argnums=2)
    tx = optax.sgd(0.1)
    step = jax.jit(steps_lib.make_train_step(steps_lib.lm_loss_fn(GPT(cfg)), tx, lambda _: 0.1))
    state = steps_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 261, (4, 17)), jnp.int32)
    empty = {"tokens": tokens, "weights": jnp.zeros((4, 16), jnp.float32)}  # e.g. prompts cut by the window
    new_state, metrics = step(state, empty)
    assert float(metrics["train_loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    for before, after in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
        np.testing.assert_array_equal(before, after)
    # A batch with assistant tokens in one row learns from that row alone; all-zero rows add nothing.
    weights = np.zeros((4, 16), np.float32)
    weights[1, 5:9] = 1
    mixed_loss, sums = loss_fn(params, {"tokens": tokens, "weights": jnp.asarray(weights)}, None)
    row_loss, row_sums = loss_fn(params, {"tokens": tokens[1:2], "weights": jnp.asarray(weights[1:2])}, None)
    assert float(sums["count"]) == float(row_sums["count"]) == 4
    np.testing.assert_allclose(float(mixed_loss), float(row_loss), rtol=1e-6)
