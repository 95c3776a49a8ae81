"""Moving weights in and out: gptlab workdirs and Hugging Face GPT-2 folders.

A workdir's model is its latest (or a chosen) checkpoint: `load_workdir` reads its
parameters, config and tokenizer; `save_workdir` writes parameters as a checkpoint
with the pretraining layout (items state/data/config/tokenizer under
WORKDIR/checkpoints/STEP), so a fine-tuning run can use it as `init_from`.

Hugging Face GPT-2 (`GPT2LMHeadModel`, a folder with config.json and
model.safetensors, read with `safetensors` alone, no PyTorch): the architectures
are the same, so conversion renames tensors. HF's Conv1D stores its weight as
(in, out), which is already the layout of a Flax Dense kernel, so unlike a
PyTorch Linear (nanoGPT's port transposes those) nothing is transposed except an
untied `lm_head.weight`, which is a torch Linear (vocab, n_embd). A gptlab model
without biases exports with zero biases, which computes the same function.
"""
import dataclasses
import json
import pathlib
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gptlab import checkpoint as checkpoint_lib
from gptlab import hf_llama
from gptlab import lora
from gptlab import model as model_lib
from gptlab import perf
from gptlab import steps as steps_lib
from gptlab import tokenizers as tokenizers_lib
from gptlab.errors import UserError

# Tensors of HF checkpoints that are not parameters: old exports carry the attention mask buffers.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
GPT2_VOCAB_SIZE = 50257


@dataclasses.dataclass
class Loaded:
    """A model read from a workdir's checkpoint."""
    params: Any
    model_cfg: model_lib.GPTConfig
    config: dict  # the run's resolved config, as stored in the checkpoint
    tokenizer_spec: dict  # the tokenizer's JSON; `tokenizer` builds it
    step: int
    directory: pathlib.Path  # the checkpoint step directory

    @property
    def tokenizer(self):
        return tokenizers_lib.from_json(self.tokenizer_spec, self.config.get("data"))


def checkpoint_steps(checkpoints: pathlib.Path) -> list:
    return checkpoint_lib.complete_steps(checkpoints)


def model_config(config: dict) -> model_lib.GPTConfig:
    """The GPTConfig a run's stored (JSON) config describes."""
    # A config written by hand or from a preset may still say "auto"; a run's config.json is resolved.
    fields = perf.resolve_model_fields(config["model"])
    # JSON turns tuples into lists; the config must stay hashable (it is a static jit argument).
    return model_lib.GPTConfig.from_config({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_workdir(workdir, step=None, strict: bool = True) -> Loaded:
    """Parameters, model config, run config and tokenizer of a workdir's checkpoint (latest by default).

    `strict`: the parameters must be exactly those of the GPT the config describes
    (a task head such as a classifier's makes that false; task evaluators pass False).
    A LoRA run's adapters come back merged into their kernels (`gptlab.lora.merge`):
    the plain model then computes exactly what the adapted one did.
    """
    directory = pathlib.Path(workdir).expanduser().absolute() / "checkpoints"
    step = checkpoint_lib.resolve_step(directory, step, f"--workdir={workdir}")  # None, "best" or a number
    steps = checkpoint_steps(directory)
    if not steps:
        raise UserError(f"--workdir={workdir} has no checkpoint (nothing in {directory}): point it at a "
                        "pretraining or fine-tuning workdir, or import GPT-2 weights with experiments.convert")
    if step is not None and int(step) not in steps:
        raise UserError(f"--workdir={workdir} has no checkpoint at step {step}: it has steps {steps}")
    try:  # read-only and pinned: the run may still be training and rotating its checkpoints
        with checkpoint_lib.Reader(directory, None if step is None else int(step)) as reader:
            step, config, tokenizer_spec = reader.step, reader.config, reader.tokenizer
            params = reader.restore_params()
    except checkpoint_lib.CorruptCheckpoint as e:
        raise UserError(f"{e}; pass --step=N for an earlier checkpoint") from None
    if lora.has_adapters(params):
        params = lora.merge(params, lora.LoRA.from_run(config).scale)
    try:
        model_cfg = model_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the config stored in {directory / str(step)} does not describe a gptlab GPT ({e}): "
                        "it was written by an incompatible gptlab version") from None
    if strict:
        if "cls_head" in params:
            raise UserError(f"{directory / str(step)} holds a classifier (cls_head), not a language model: "
                            "sample from or export its init_from run, or evaluate it with experiments.evaluate")
        expected = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
        checkpoint_lib.check_same_shapes(params, expected, where=f"checkpoint step {step} in {directory}")
    return Loaded(params, model_cfg, config, tokenizer_spec, step, directory / str(step))


def save_workdir(workdir, params, config: dict, tokenizer_spec: dict, source: str, step: int = 0) -> pathlib.Path:
    """Writes `params` as a checkpoint of `workdir` with the pretraining layout; returns its directory.

    The state item holds step, params and rng like a train state, with no optimizer
    state (None); `data` records where the weights came from.
    """
    workdir = checkpoint_lib.check_writable(workdir)
    if checkpoint_steps(workdir / "checkpoints"):
        raise UserError(f"--workdir={workdir} already has checkpoints: choose an empty --workdir")
    state = steps_lib.TrainState(step=jnp.array(step, jnp.int32), params=params, opt_state=None,
                       rng=jax.random.key_data(jax.random.key(0)))
    (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    checkpoints = checkpoint_lib.Checkpoints(workdir / "checkpoints", max_to_keep=1, async_save=False)
    try:
        checkpoints.save(step, state, data={"source": source}, config=config, tokenizer=tokenizer_spec)
    finally:
        checkpoints.close()
    return checkpoints.directory / str(step)


def run_config(model_cfg: model_lib.GPTConfig, tokenizer: str, base_config) -> dict:
    """A resolved pretraining config (as JSON) describing `model_cfg`, for an imported model.

    `base_config` (a pretraining ConfigDict, left unchanged) gives every field the model does not: the entry
    point passes configs/pretrain.py's, so the library imports nothing from configs/."""
    config = base_config.copy_and_resolve_references()
    with config.unlocked():
        for field in dataclasses.fields(model_cfg):
            if field.name in config.model:
                config.model[field.name] = getattr(model_cfg, field.name)
        config.data.tokenizer = tokenizer
        config.data.seq_len = model_cfg.block_size
        config.data.exclude = ()
    return json.loads(config.to_json_best_effort())


# --- Hugging Face GPT-2 ---------------------------------------------------------------------

def hf_names(cfg: model_lib.GPTConfig) -> dict:
    """gptlab parameter path -> HF GPT2LMHeadModel tensor name (without the `transformer.` prefix)."""
    names = {"wte/embedding": "wte.weight", "wpe/embedding": "wpe.weight",
             "ln_f/scale": "ln_f.weight", "ln_f/bias": "ln_f.bias"}
    for i in range(cfg.n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            names[f"blocks_{i}/{ours}/scale"] = f"h.{i}.{theirs}.weight"
            names[f"blocks_{i}/{ours}/bias"] = f"h.{i}.{theirs}.bias"
        for ours, theirs in (("attn/qkv", "attn.c_attn"), ("attn/proj", "attn.c_proj"),
                             ("mlp/fc", "mlp.c_fc"), ("mlp/proj", "mlp.c_proj")):
            names[f"blocks_{i}/{ours}/kernel"] = f"h.{i}.{theirs}.weight"
            names[f"blocks_{i}/{ours}/bias"] = f"h.{i}.{theirs}.bias"
    if not cfg.tie_embeddings:
        names["lm_head/kernel"] = "lm_head.weight"
    return names


def _resolve_hf_dir(source: str) -> pathlib.Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (needs internet)."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return path
    fix = "pass a local folder holding config.json and model.safetensors (saved with save_pretrained)"
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"--from_hf={source} is not a folder: {fix}")
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"--from_hf={source} is not a local folder, and downloading a hub id needs "
                        f"`pip install -e \".[hub]\"` (huggingface_hub); or {fix}") from None
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            source, allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json",
                                    "model-*.safetensors"]))
    except Exception as e:  # pylint: disable=broad-except
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--from_hf={source} is not a local folder and could not be downloaded from the "
                        f"Hugging Face hub ({reason}): {fix}") from None


def read_hf_config(hf_dir: pathlib.Path) -> model_lib.GPTConfig:
    """The gptlab model config of a HF GPT-2 or Llama/Qwen2 folder; other architectures and variants are refused."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json: point --from_hf at a folder saved with save_pretrained")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({str(e).splitlines()[0]}): point --from_hf at a folder "
                        "saved with save_pretrained, or repair its config.json") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} holds a JSON {type(hf).__name__}, not an object of settings: point --from_hf "
                        "at a folder saved with save_pretrained, or repair its config.json")
    model_type = hf.get("model_type")
    if model_type in hf_llama.ARCHITECTURES:
        _check_numbers(hf, path, HF_LLAMA_NUMBERS)
        try:
            unsupported, fields = hf_llama.variants(hf), hf_llama.config_fields(hf)
        except (TypeError, ValueError, AttributeError) as e:  # e.g. rope_parameters that is not an object
            raise UserError(f"{path} has a setting of the wrong type ({e}): repair the file or re-export the "
                            "model with save_pretrained") from None
    elif model_type == "gpt2":
        _check_numbers(hf, path, HF_GPT2_NUMBERS)
        n_embd = hf.get("n_embd", 768)
        unsupported = {
            "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
            "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
            "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
            "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
            "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
            "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        }
        fields = dict(vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
                      block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), n_layer=hf.get("n_layer", 12),
                      n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=0.0, bias=True,
                      tie_embeddings=hf.get("tie_word_embeddings", True))
    else:
        raise UserError(f"{hf_dir} holds a {model_type!r} model ({', '.join(hf.get('architectures') or [])}): "
                        f"gptlab imports GPT-2 and {'/'.join(hf_llama.ARCHITECTURES)} checkpoints (model_type "
                        f"{['gpt2', *hf_llama.ARCHITECTURES]})")
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise UserError(f"{hf_dir}/config.json has {key}={value!r}, a {model_type} variant gptlab's model does "
                            f"not implement (it supports {key} in {list(allowed)}): import a standard {model_type}")
    try:
        return model_lib.GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"{hf_dir}/config.json: {e}") from None


# config.json keys that must hold whole numbers (None allowed where HF allows it), per family.
HF_GPT2_NUMBERS = ("vocab_size", "n_positions", "n_ctx", "n_layer", "n_head", "n_embd", "n_inner")
HF_LLAMA_NUMBERS = ("vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
                    "hidden_size", "num_key_value_heads", "intermediate_size", "head_dim")


def _check_numbers(hf: dict, path: pathlib.Path, keys) -> None:
    """A wrongly typed size (`"n_layer": "two"`) is one line here, not a traceback deep in the import."""
    for key in keys:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{path} has {key}={value!r}: it must be a positive whole number; repair the file "
                            "or re-export the model with save_pretrained")
    for key in ("layer_norm_epsilon", "rms_norm_eps", "rope_theta"):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path} has {key}={value!r}: it must be a number; repair the file "
                            "or re-export the model with save_pretrained")


def _read_safetensors(hf_dir: pathlib.Path) -> dict:
    from safetensors import SafetensorError, safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        other = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack"))
        raise UserError(f"{hf_dir} has no model.safetensors{f' (it has {other})' if other else ''}: gptlab reads "
                        "safetensors without PyTorch; re-save the model with save_pretrained(dir) "
                        "(safetensors is its default format)")
    tensors = {}
    for name in files:
        # framework="flax" reads bfloat16/float16 files too, which numpy cannot represent.
        try:
            with safe_open(str(hf_dir / name), framework="flax") as f:
                for key in f.keys():
                    tensors[key.removeprefix("transformer.").removeprefix("model.")] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:  # a truncated or damaged file
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{hf_dir / name} cannot be read ({reason}): it is truncated or damaged; "
                            "download it or save_pretrained it again") from None
    return tensors


def _gpt2_params(tensors: dict, cfg: model_lib.GPTConfig, hf_dir) -> tuple:
    """({gptlab path: array}, HF tensor names used) of a GPT2LMHeadModel folder's tensors."""
    flat = {}
    for path, name in hf_names(cfg).items():
        if name not in tensors:
            raise UserError(f"{hf_dir} has no tensor {name!r} (gptlab's {path}), which a GPT-2 with "
                            f"{cfg.n_layer} layers needs: the checkpoint is incomplete or of another model")
        flat[path] = tensors[name].T if path == "lm_head/kernel" else tensors[name]
    return flat, set(hf_names(cfg).values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())


def from_hf(source: str, workdir, base_config, log=print) -> Loaded:
    """Imports a HF GPT-2 or Llama/Qwen2 folder (or hub id) into `workdir` as a gptlab checkpoint at step 0."""
    hf_dir = _resolve_hf_dir(source)
    cfg = read_hf_config(hf_dir)
    llama = hf_llama.is_llama_style(cfg)
    family = "Llama-style" if llama else "GPT-2"
    tensors = _read_safetensors(hf_dir)
    flat, used = (hf_llama.params_from if llama else _gpt2_params)(tensors, cfg, hf_dir)
    expected = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    for path, leaf in flax.traverse_util.flatten_dict(expected, sep="/").items():
        if tuple(flat[path].shape) != tuple(leaf.shape):
            raise UserError(f"{hf_dir}: the tensor(s) of gptlab's {path} have shape {tuple(flat[path].shape)} but "
                            f"config.json implies {tuple(leaf.shape)}: the config and the weights do not belong together")
        flat[path] = jnp.asarray(flat[path], jnp.float32)
    extra = sorted(k for k in tensors if k not in used and not k.endswith(HF_BUFFERS)
                   and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(f"{hf_dir} has tensor {extra[0]!r} that a plain {family} model does not: it is not a "
                        "checkpoint of an architecture gptlab imports")
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    if llama and (hf_dir / "tokenizer.json").is_file():  # the model's own tokenizer and chat template, stored inside
        from gptlab import hf_tokenizer  # pylint: disable=import-outside-toplevel

        tokenizer_spec, tokenizer = hf_tokenizer.HFTokenizer.from_dir(hf_dir).to_json(), "huggingface"
        log(f"tokenizer: {hf_dir / 'tokenizer.json'} (Hugging Face tokenizers) stored with the checkpoint"
            + ("" if tokenizer_spec["config"].get("chat_template") else "; no chat template"))
    elif llama:  # token ids must come from the model's own tokenizer, outside gptlab
        tokenizer_spec, tokenizer = {"kind": "huggingface", "source": str(source)}, "huggingface"
        log(f"note: {hf_dir} has no tokenizer.json, so this model has no tokenizer in gptlab: "
            "its weights, logits and exports are exact, but text must be tokenised outside gptlab")
    else:
        if cfg.vocab_size < GPT2_VOCAB_SIZE:
            log(f"note: vocabulary {cfg.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE}: "
                "text must be tokenised with the tokenizer this model was trained with")
        tokenizer_spec, tokenizer = gpt2_tokenizer_spec(log), "gpt2"
    config = run_config(cfg, tokenizer, base_config)
    directory = save_workdir(workdir, params, config, tokenizer_spec, source=f"huggingface:{source}")
    log(f"imported {family} from {hf_dir}: {model_lib.count_params(params) / 1e6:.2f}M parameters, "
        f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} key/value), {cfg.n_embd} wide, context "
        f"{cfg.block_size}, vocab {cfg.vocab_size}; wrote {directory}")
    return Loaded(params, cfg, config, tokenizer_spec, 0, directory)


def gpt2_tokenizer_spec(log=print) -> dict:
    """What an imported GPT-2 stores as its tokenizer: GPT-2's BPE (gptlab.tokenizers, kind "gpt2").

    When the BPE encoding file is on this machine the spec names it; otherwise the
    spec has no file, and `tokenizers.from_json` looks for it where tiktoken caches it.
    """
    try:
        return tokenizers_lib.GPT2Tokenizer().to_json()
    except UserError:
        log("note: GPT-2's BPE encoding file is not on this machine; sampling and evaluating with the imported "
            "model's tokenizer need it (see data.gpt2_encoding_file in configs/pretrain.py)")
        return {"kind": "gpt2", "encoding_sha256": tokenizers_lib.GPT2_ENCODING_SHA256}


def hf_config(cfg: model_lib.GPTConfig, eot_id=None) -> dict:
    """config.json of a GPT2LMHeadModel with `cfg`'s architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def to_hf_tensors(params, cfg: model_lib.GPTConfig) -> dict:
    """HF GPT2LMHeadModel or LlamaForCausalLM tensors (float32 numpy) from gptlab parameters."""
    flat = {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    if cfg.scan_layers:  # stacked blocks: HF has one set of tensors per layer
        flat = {(model_lib.layer_path(str(i), k.split("/", 1)[1]) if k.startswith("blocks/") else k): (v[i] if k.startswith("blocks/") else v)
                for k, v in flat.items() for i in (range(cfg.n_layer) if k.startswith("blocks/") else [0])}
    if hf_llama.is_llama_style(cfg):
        return hf_llama.tensors_from(flat, cfg)
    if (cfg.position, cfg.norm, cfg.mlp, cfg.kv_heads, cfg.qkv_bias, cfg.norm_eps) != (
            "learned", "layernorm", "gelu", cfg.n_head, False, 1e-5):
        raise UserError(f"this model (position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, n_kv_head="
                        f"{cfg.n_kv_head}, bias={cfg.bias}) is neither GPT-2 nor Llama-style: only those export to "
                        "Hugging Face folders")
    names = hf_names(cfg)
    extra = sorted(set(flat) - set(names))
    if extra:
        raise UserError(f"parameter {extra[0]} has no GPT-2 counterpart: only language models export to "
                        "GPT2LMHeadModel (a task head such as a classifier's is not part of it)")
    tensors = {}
    for path, name in names.items():
        if path in flat:
            value = flat[path].T if path == "lm_head/kernel" else flat[path]
        else:  # model.bias=False: GPT-2 always has biases, and zeros compute the same function
            layer = path.rsplit("/", 1)[0]
            weight = flat.get(f"{layer}/scale", flat.get(f"{layer}/kernel"))
            value = np.zeros(weight.shape[-1:], np.float32)
        tensors[name if name.startswith("lm_head") else f"transformer.{name}"] = np.ascontiguousarray(value)
    return tensors


def to_hf(workdir, hf_dir, step=None, log=print) -> pathlib.Path:
    """Exports a workdir's model as a HF GPT-2 or Llama/Qwen2 folder (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    loaded = load_workdir(workdir, step)  # a LoRA run's adapters come merged
    params, cfg = loaded.params, loaded.model_cfg
    tensors = to_hf_tensors(params, cfg)
    out = pathlib.Path(hf_dir).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--to_hf={hf_dir} is not empty: choose a new or empty folder")
    checkpoint_lib.check_writable(out)
    try:
        tokenizer = loaded.tokenizer
        eot_id = tokenizer.eot_id if tokenizer.vocab_size <= loaded.model_cfg.vocab_size else None
    except UserError:  # a tokenizer this gptlab cannot build: the weights export all the same
        eot_id = None
    config = (hf_llama.hf_config if hf_llama.is_llama_style(cfg) else hf_config)(cfg, eot_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # transformers refuses safetensors files whose metadata does not name a framework.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    log(f"exported {loaded.directory} (step {loaded.step}) to {out} as {config['architectures'][0]} "
        f"({model_lib.count_params(loaded.params) / 1e6:.2f}M parameters, {loaded.tokenizer_spec.get('kind')} "
        "tokenizer)")
    return out
