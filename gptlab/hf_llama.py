"""Hugging Face Llama-family folders (`LlamaForCausalLM`, `Qwen2ForCausalLM`) and gptlab's
Llama-style model (`position=rope, norm=rmsnorm, mlp=swiglu, bias=False`).

Read and written with `safetensors` alone, no PyTorch. HF stores torch Linear weights
(out, in); a Flax kernel is (in, out), so every projection is transposed. The query,
key and value projections are one kernel here (`attn/qkv`, heads then key/value heads,
as `gptlab.model.CausalSelfAttention` splits it); HF's rotary layout (rotate_half:
the two halves of a head are the pair coordinates) is the one `gptlab.model.rope`
uses, so no permutation is needed. Qwen2 is Llama with biases on q/k/v (`qkv_bias`).
"""
import numpy as np

from gptlab import model as model_lib
from gptlab.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def is_llama_style(cfg: model_lib.GPTConfig) -> bool:
    return (cfg.position, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False)


def variants(hf: dict) -> dict:
    """config.json setting -> (its value, the values gptlab's model computes), for `convert.read_hf_config`."""
    heads, hidden = hf.get("num_attention_heads", 32), hf.get("hidden_size", 4096)
    return {
        "hidden_act": (hf.get("hidden_act", "silu"), ("silu",)),
        "rope_scaling": (hf.get("rope_scaling"), (None,)),  # transformers 4
        "rope_parameters.rope_type": ((hf.get("rope_parameters") or {}).get("rope_type", "default"), ("default",)),
        "attention_bias": (hf.get("attention_bias", False), (False,)),
        "mlp_bias": (hf.get("mlp_bias", False), (False,)),
        "head_dim": (hf.get("head_dim"), (None, hidden // heads)),
        "use_sliding_window": (hf.get("use_sliding_window", False), (False,)),
        "pretraining_tp": (hf.get("pretraining_tp", 1), (1,)),
    }


def rope_theta(hf: dict) -> float:
    """transformers 5 keeps it in `rope_parameters`, transformers 4 at the top level."""
    return (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta", 10000.0)


def config_fields(hf: dict) -> dict:
    """The `GPTConfig` fields of a HF Llama/Qwen2 config.json (transformers' defaults where a key is absent)."""
    heads = hf.get("num_attention_heads", 32)
    return dict(vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
                n_layer=hf.get("num_hidden_layers", 32), n_head=heads, n_embd=hf.get("hidden_size", 4096),
                n_kv_head=hf.get("num_key_value_heads") or heads, dropout=0.0, bias=False,
                qkv_bias=hf["model_type"] == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False),
                position="rope", rope_theta=float(rope_theta(hf)), norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", mlp_hidden=hf.get("intermediate_size", 11008))


def _names(cfg: model_lib.GPTConfig, i: int) -> dict:
    """Block i: gptlab kernel path -> HF weight names (concatenated along gptlab's output axis)."""
    p = f"layers.{i}."
    return {f"blocks_{i}/attn/qkv": [p + f"self_attn.{x}_proj" for x in "qkv"],
            f"blocks_{i}/attn/proj": [p + "self_attn.o_proj"], f"blocks_{i}/mlp/gate": [p + "mlp.gate_proj"],
            f"blocks_{i}/mlp/fc": [p + "mlp.up_proj"], f"blocks_{i}/mlp/proj": [p + "mlp.down_proj"]}


def _layout(cfg: model_lib.GPTConfig) -> dict:
    """gptlab parameter path -> (HF tensor names, transposed?) for every parameter."""
    layout = {"wte/embedding": (["embed_tokens.weight"], False), "ln_f/scale": (["norm.weight"], False)}
    for i in range(cfg.n_layer):
        layout[f"blocks_{i}/ln_1/scale"] = ([f"layers.{i}.input_layernorm.weight"], False)
        layout[f"blocks_{i}/ln_2/scale"] = ([f"layers.{i}.post_attention_layernorm.weight"], False)
        for path, names in _names(cfg, i).items():
            layout[f"{path}/kernel"] = ([n + ".weight" for n in names], True)
        if cfg.qkv_bias:
            layout[f"blocks_{i}/attn/qkv/bias"] = ([n + ".bias" for n in _names(cfg, i)[f"blocks_{i}/attn/qkv"]], False)
    if not cfg.tie_embeddings:
        layout["lm_head/kernel"] = (["lm_head.weight"], True)
    return layout


def params_from(tensors: dict, cfg: model_lib.GPTConfig, hf_dir) -> tuple:
    """({gptlab path: float32 array}, HF tensor names used) from a folder's tensors (`model.` prefix removed)."""
    flat, used = {}, set()
    for path, (names, transposed) in _layout(cfg).items():
        parts = []
        for name in names:
            if name not in tensors:
                raise UserError(f"{hf_dir} has no tensor {name!r} (part of gptlab's {path}), which a Llama-style model "
                                f"with {cfg.n_layer} layers needs: the checkpoint is incomplete or of another model")
            value = np.asarray(tensors[name], np.float32)
            parts.append(value.T if transposed else value)
            used.add(name)
        flat[path] = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return flat, used


def tensors_from(flat: dict, cfg: model_lib.GPTConfig) -> dict:
    """HF tensors (float32 numpy, with the `model.` prefix) from gptlab's flat parameters."""
    layout = _layout(cfg)
    extra = sorted(set(flat) - set(layout))
    if extra:
        raise UserError(f"parameter {extra[0]} has no {ARCHITECTURES['llama']} counterpart: only language models "
                        "export (a task head such as a classifier's is not part of it)")
    head_dim, kv_width = cfg.head_dim, cfg.kv_heads * cfg.head_dim
    tensors = {}
    for path, (names, transposed) in layout.items():
        value = np.asarray(flat[path], np.float32)
        # The fused q/k/v splits back at the widths of q (heads) and k, v (key/value heads).
        splits = np.split(value, [cfg.n_head * head_dim, cfg.n_head * head_dim + kv_width], axis=-1) \
            if len(names) == 3 else [value]
        for name, part in zip(names, splits):
            key = name if name.startswith("lm_head") else f"model.{name}"
            tensors[key] = np.ascontiguousarray(part.T if transposed else part)
    return tensors


def hf_config(cfg: model_lib.GPTConfig, eot_id=None) -> dict:
    """config.json of a LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases) with `cfg`'s architecture."""
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    return {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "head_dim": cfg.head_dim,
        # Both spellings: transformers 5 reads rope_parameters, transformers 4 rope_theta.
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": cfg.dropout, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def transformers_model(cfg: model_lib.GPTConfig, attn_implementation: str = "sdpa"):
    """The transformers (PyTorch) twin of a Llama-style gptlab model, randomly initialised (benchmark peer)."""
    import transformers

    spec = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")}
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec, attn_implementation=attn_implementation)
    return transformers.AutoModelForCausalLM.from_config(config)
