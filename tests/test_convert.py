"""GPT-2 interop measured against the real reference: transformers' GPT2LMHeadModel on CPU."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, needs

torch = needs("torch", "bench")  # the reference implementation: transformers' GPT2LMHeadModel on CPU
transformers = needs("transformers", "bench")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
from gptlab import convert, lora
from gptlab.errors import UserError
from gptlab.model import GPT, GPTConfig, init_params
from configs import pretrain as pretrain_config

BASE_CONFIG = pretrain_config.get_config("small")  # what experiments.convert passes

TOLERANCE = 1e-4  # float32 logits, absolute


def hf_model(directory, *, vocab_size, n_layer, n_head, n_embd, n_positions, tie=True, seed=0):
    """A GPT2LMHeadModel with every parameter random (biases and LayerNorms too), saved offline."""
    torch.manual_seed(seed)
    eot = min(50256, vocab_size - 1)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, tie_word_embeddings=tie, bos_token_id=eot, eos_token_id=eot)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def gptlab_logits(params, cfg, tokens):
    return np.asarray(GPT(cfg).apply({"params": params}, tokens))


def imported_reference(tmp_path, make_model, spec):
    """(the transformers model `make_model(**spec)` saved to tmp_path/hf, its import into tmp_path/run)."""
    reference = make_model(tmp_path / "hf", **spec)
    return reference, convert.from_hf(str(tmp_path / "hf"), tmp_path / "run", BASE_CONFIG, log=lambda *_: None)


def assert_logits_match(label, ours, theirs):
    difference = float(np.max(np.abs(ours - theirs)))
    print(f"\n{label}: max |logits difference| vs transformers = {difference:.3g} "
          f"(logits up to {np.max(np.abs(theirs)):.3g})")
    assert difference < TOLERANCE, difference


SHAPES = {
    # vocabulary 50257 (GPT-2's own) with a non-power-of-two head count
    "gpt2-vocab-3-heads": dict(vocab_size=50257, n_layer=2, n_head=3, n_embd=48, n_positions=32),
    "5-heads-untied": dict(vocab_size=97, n_layer=3, n_head=5, n_embd=40, n_positions=24, tie=False),
    "1-layer-4-heads": dict(vocab_size=257, n_layer=1, n_head=4, n_embd=64, n_positions=64),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_imported_gpt2_gives_hugging_faces_logits(tmp_path, shape):
    spec = SHAPES[shape]
    reference, imported = imported_reference(tmp_path, hf_model, spec)
    cfg = imported.model_cfg
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (
        spec["vocab_size"], spec["n_layer"], spec["n_head"], spec["n_embd"], spec["n_positions"])
    assert cfg.tie_embeddings == spec.get("tie", True)
    # The checkpoint has the pretraining layout and reads back as the same model.
    loaded = convert.load_workdir(tmp_path / "run")
    assert loaded.step == 0 and loaded.model_cfg == cfg and loaded.tokenizer_spec["kind"] == "gpt2"
    assert loaded.config["model"]["n_head"] == spec["n_head"] and loaded.config["data"]["tokenizer"] == "gpt2"
    for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    tokens = np.random.default_rng(0).integers(0, spec["vocab_size"], (2, spec["n_positions"]))
    theirs = hf_logits(reference, tokens)
    assert_logits_match(shape, gptlab_logits(loaded.params, cfg, tokens), theirs)


def _random_gptlab(cfg, seed=0, adapters=None):
    """Initialised parameters with biases and LayerNorms moved off 0 and 1, so they are exercised."""
    params = init_params(cfg, jax.random.key(seed))
    if adapters is not None:
        params = lora.add(params, adapters, jax.random.key(seed + 2))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("bias,tie", [(True, True), (False, False)])
def test_export_round_trip_through_from_pretrained_gives_the_same_logits(tmp_path, bias, tie):
    cfg = GPTConfig(vocab_size=61, block_size=20, n_layer=2, n_head=3, n_embd=24, bias=bias, tie_embeddings=tie)
    params = _random_gptlab(cfg)
    config = convert.run_config(cfg, "byte", BASE_CONFIG)
    convert.save_workdir(tmp_path / "run", params, config, {"kind": "byte"}, source="test")
    convert.to_hf(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(1).integers(0, 61, (3, 20))
    difference = float(np.max(np.abs(gptlab_logits(params, cfg, tokens) - hf_logits(reference, tokens))))
    print(f"\nexport bias={bias} tie={tie}: max |logits difference| after from_pretrained = {difference:.3g}")
    assert difference < TOLERANCE, difference
    # ... and importing the export back gives the very same parameters (zero biases where bias=False).
    back = convert.from_hf(str(tmp_path / "hf"), tmp_path / "back", BASE_CONFIG, log=lambda *_: None).params
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, value in jax.tree_util.tree_leaves_with_path(back):
        if path in flat:
            np.testing.assert_array_equal(value, flat[path])
        else:
            assert path[-1].key == "bias" and not np.any(value), path


def test_other_architectures_and_incomplete_folders_are_refused(tmp_path):
    hf_model(tmp_path / "hf", vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=8)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="holds a 'bert' model .* gptlab imports GPT-2 and llama/qwen2"):
        convert.from_hf(str(bert), tmp_path / "a", BASE_CONFIG)

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(incomplete / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="has no tensor 'h.1.mlp.c_fc.bias'"):
        convert.from_hf(str(incomplete), tmp_path / "b", BASE_CONFIG)

    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    (torch_only / "config.json").write_text(json.dumps(config))
    (torch_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no model.safetensors .*pytorch_model.bin"):
        convert.from_hf(str(torch_only), tmp_path / "c", BASE_CONFIG)

    with pytest.raises(UserError, match="is not a folder"):
        convert.from_hf(str(tmp_path / "no" / "such" / "dir"), tmp_path / "d", BASE_CONFIG)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_convert_entry_point_imports_and_refuses_a_workdir_without_checkpoint(tmp_path):
    hf_model(tmp_path / "hf", vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_positions=8)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.convert", *args], cwd=REPO,
                                       capture_output=True, text=True, timeout=120, env=env)
    result = run(f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "imported GPT-2" in result.stdout and (tmp_path / "run" / "checkpoints" / "0" / "state").is_dir()
    result = run(f"--workdir={tmp_path / 'empty'}", f"--to_hf={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "has no checkpoint" in result.stderr


def test_a_damaged_checkpoint_is_refused_with_the_fix(tmp_path):
    cfg = GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=16)
    directory = convert.save_workdir(tmp_path / "run", init_params(cfg, jax.random.key(0)),
                                     convert.run_config(cfg, "byte", BASE_CONFIG), {"kind": "byte"}, source="test")
    record = directory / "integrity" / "metadata"
    integrity = json.loads(record.read_text())
    integrity["fingerprints"]["params/blocks_0/mlp/fc/kernel"] += 1  # as if the array file had changed since
    record.write_text(json.dumps(integrity))
    with pytest.raises(UserError, match="is damaged: array params/blocks_0/mlp/fc/kernel differs .* --step=N"):
        convert.load_workdir(tmp_path / "run")


def test_a_lora_fine_tuned_checkpoint_exports_with_its_adapters_merged(tmp_path):
    cfg = GPTConfig(vocab_size=61, block_size=12, n_layer=2, n_head=2, n_embd=16)
    adapters = lora.LoRA(rank=2, alpha=16.0, targets=(r"blocks_\d+/attn/(qkv|proj)/kernel",))
    params = _random_gptlab(cfg, adapters=adapters)  # lora_b moved off zero, so the adapters change the logits
    config = convert.run_config(cfg, "byte", BASE_CONFIG)
    config["finetune"] = {"strategy": "lora", "task": "lm", "lora_rank": 2, "lora_alpha": adapters.alpha,
                          "lora_targets": list(adapters.targets)}
    convert.save_workdir(tmp_path / "run", params, config, {"kind": "byte"}, source="test")
    loaded = convert.load_workdir(tmp_path / "run")  # the adapters come back merged into the plain model
    assert loaded.model_cfg == cfg and not lora.has_adapters(loaded.params)
    adapted_logits = np.asarray(lora.Adapted(GPT(cfg), adapters.scale).apply({"params": params}, np.zeros((1, 12), int)))
    np.testing.assert_array_equal(gptlab_logits(loaded.params, cfg, np.zeros((1, 12), int)), adapted_logits)
    convert.to_hf(tmp_path / "run", tmp_path / "hf", log=lambda *_: None)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(2).integers(0, 61, (2, 12))
    adapted = lora.Adapted(GPT(cfg), adapters.scale).apply({"params": params}, tokens)
    difference = float(np.max(np.abs(np.asarray(adapted) - hf_logits(reference, tokens))))
    print(f"\nmerged LoRA export: max |logits difference| after from_pretrained = {difference:.3g}")
    assert difference < TOLERANCE, difference


# --- Llama-family (LlamaForCausalLM, Qwen2ForCausalLM) ----------------------------------------

LLAMA_SHAPES = {
    # grouped-query attention with 6 heads sharing 2 key/value heads, untied head, non-default RoPE theta
    "gqa-6-heads-2-kv-untied-theta-5000": dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=80,
                                               num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                               max_position_embeddings=32, rope_theta=5000.0, rms_norm_eps=1e-5,
                                               tie_word_embeddings=False),
    "mha-tied-3-layers": dict(model_type="llama", vocab_size=61, hidden_size=40, intermediate_size=72,
                              num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5,
                              max_position_embeddings=24, tie_word_embeddings=True),
    "qwen2-qkv-biases-mqa": dict(model_type="qwen2", vocab_size=83, hidden_size=32, intermediate_size=56,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 max_position_embeddings=20, rope_theta=1e6, tie_word_embeddings=False),
}


def hf_llama_model(directory, model_type="llama", seed=0, **spec):
    """A LlamaForCausalLM (or Qwen2ForCausalLM) with every parameter random, saved offline."""
    torch.manual_seed(seed)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    model = model_class(config_class(**spec, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("shape", LLAMA_SHAPES)
def test_imported_llama_gives_hugging_faces_logits_and_exports_back(tmp_path, shape):
    spec, (reference, imported) = LLAMA_SHAPES[shape], imported_reference(tmp_path, hf_llama_model, LLAMA_SHAPES[shape])
    cfg = imported.model_cfg
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.bias, cfg.qkv_bias) == (
        "rope", "rmsnorm", "swiglu", False, spec["model_type"] == "qwen2")
    assert (cfg.n_head, cfg.kv_heads, cfg.hidden, cfg.tie_embeddings) == (
        spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"], spec["tie_word_embeddings"])
    loaded = convert.load_workdir(tmp_path / "run")
    assert loaded.model_cfg == cfg
    tokens = np.random.default_rng(0).integers(0, spec["vocab_size"], (2, spec["max_position_embeddings"]))
    theirs = hf_logits(reference, tokens)
    assert_logits_match(shape, gptlab_logits(loaded.params, cfg, tokens), theirs)
    # Exported again, transformers loads it and computes the same logits; its tensors are the originals.
    convert.to_hf(tmp_path / "run", tmp_path / "out", log=lambda *_: None)
    exported = type(reference).from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(exported, tokens), theirs, atol=1e-6)
    original, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(original) - ({"lm_head.weight"} if spec["tie_word_embeddings"] else set())
    for name, value in back.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_llama_variants_gptlab_cannot_compute_are_refused(tmp_path):
    spec = dict(LLAMA_SHAPES["mha-tied-3-layers"])
    hf_llama_model(tmp_path / "hf", **spec)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(UserError, match="rope_scaling=.* a llama variant gptlab's model does not implement"):
        convert.from_hf(str(scaled), tmp_path / "a", BASE_CONFIG)
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match="holds a 'mistral' model"):
        convert.from_hf(str(mistral), tmp_path / "b", BASE_CONFIG)
