"""PyTorch peers for `gptlab.benchmark`: the same GPT in eager PyTorch, two ways.

- `transformers`: Hugging Face's `GPT2LMHeadModel` (SDPA attention), what most people run.
- `nanogpt`: a nanoGPT-style model written here (one SDPA attention call per block,
  GELU-tanh MLP, tied head, biases as `model.bias` says), what a hand-written PyTorch
  training script runs.

Both take the same shapes as the gptlab model and train with AdamW and the same
gradient clipping; `hf_generate` times Hugging Face `generate` with its key/value cache.
Imported only by the benchmark, only when a PyTorch comparison is asked for.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

PEERS = ("transformers", "nanogpt")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1; nanoGPT's own)."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = LayerNorm(n_embd, bias), LayerNorm(n_embd, bias)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        batch, seq_len, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        heads = lambda t: t.view(batch, seq_len, self.n_head, width // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(batch, seq_len, width))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: token + position embeddings, pre-LN blocks, final LayerNorm, tied head."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, bias: bool,
                 tie_embeddings: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init: N(0, 0.02), residual projections scaled down
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2(model_cfg):
    """transformers' GPT2LMHeadModel with gptlab's `model_cfg` shapes, dropout 0, SDPA attention."""
    import transformers

    hf_config = transformers.GPT2Config(
        vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size, n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        tie_word_embeddings=model_cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(hf_config)


def build(peer: str, model_cfg, device):
    """The peer's model with gptlab's `model_cfg` shapes (dropout 0), in training mode on `device`."""
    if peer == "nanogpt":
        model = NanoGPT(model_cfg.vocab_size, model_cfg.block_size, model_cfg.n_layer, model_cfg.n_head,
                        model_cfg.n_embd, model_cfg.bias, model_cfg.tie_embeddings)
        return model.to(device).train(), lambda tokens: model(tokens)
    model = gpt2(model_cfg).to(device).train()
    return model, lambda tokens: model(tokens).logits


def describe(peer: str, model_cfg) -> str:
    if peer == "nanogpt":
        return f"nanoGPT-style eager model (gptlab/torch_peers.py, sdpa), {'with' if model_cfg.bias else 'no'} biases"
    return "transformers GPT2LMHeadModel (sdpa)" + ("" if model_cfg.bias else ", with biases (GPT-2 always has them)")


def hf_generate(model_cfg, batch_size: int, prompt_len: int, new_tokens: int, threads: int, repeats: int = 2,
                seed: int = 0) -> float:
    """Tokens/s of Hugging Face `generate` (greedy, key/value cache) for GPT2LMHeadModel of these shapes.

    The best of `repeats` timed calls after an untimed one; exactly `new_tokens` per row.
    """
    import time

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = gpt2(model_cfg).eval()
    prompts = torch.randint(0, model_cfg.vocab_size, (batch_size, prompt_len))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompts))
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = model.generate(prompts, **kwargs)
            elapsed = time.perf_counter() - start
            assert out.shape[1] == prompt_len + new_tokens, out.shape
            if i:
                best = min(best, elapsed)
    return batch_size * new_tokens / best
