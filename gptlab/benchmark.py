"""Training speed of the real train step: compile time, step time, tokens/s, MFU, and a PyTorch peer.

`run(config, steps, ...)` builds the experiment exactly as pretraining does
(`train.pretrain_experiment`, `train.init_and_compile`, `train.prefetched`), so the
timed function is the compiled step the loop runs, fed by the real input pipeline
or, with `synthetic=True`, by random tokens (no dataset is prepared or read).

With `compare="torch"`, Hugging Face transformers' `GPT2LMHeadModel` (SDPA attention)
of the same shapes trains on the same batches with AdamW at the same precision,
timed the same way, in blocks that alternate with gptlab's, so that noise from a
shared machine falls on both. PyTorch and transformers are imported only then.
"""
import os
import time

import jax
import numpy as np

from gptlab import hf_llama
from gptlab import parallel as parallel_lib
from gptlab import perf
from gptlab import train
from gptlab.data import pipeline
from gptlab.errors import UserError

COMPARE = ("", "torch")


class SyntheticTokenizer:
    """Stands in for the configured tokenizer: only its vocabulary size matters to the model."""

    kind = "synthetic"
    eot_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def synthetic_vocab_size(config) -> int:
    """model.vocab_size if set, otherwise the vocabulary the configured tokenizer would have."""
    data = config.data
    if config.model.vocab_size:
        return config.model.vocab_size
    if data.tokenizer == "byte":
        return 257
    if data.tokenizer == "gpt2":
        return 50257
    if data.tokenizer == "sentencepiece":
        return data.sentencepiece_vocab_size
    raise UserError(f"--synthetic with data.tokenizer={data.tokenizer!r}: the vocabulary comes from the data, "
                    "so set --config.model.vocab_size (e.g. 65 for nanoGPT's Shakespeare characters)")


class SyntheticBatches:
    """Uniformly random token windows, a fresh batch per call; `state()`/`restore()` like WindowBatches."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.shape = (batch_size // jax.process_count(), seq_len + 1)
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {"tokens": self.rng.integers(0, self.vocab_size, self.shape, dtype=np.int32)}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        del state


class SyntheticData:
    """What `train.pretrain_experiment` needs from `pipeline.Data`, without any dataset."""

    def __init__(self, config, seq_len: int):
        self.tokenizer = SyntheticTokenizer(synthetic_vocab_size(config))
        self._args = (self.tokenizer.vocab_size, seq_len, config.data.batch_size)
        self.train = SyntheticBatches(*self._args, config.seed)

    def eval_batches(self, num_batches: int) -> list:
        batches = SyntheticBatches(*self._args, seed=1)
        return [next(batches) for _ in range(num_batches)]


def pipeline_tokens_per_s(batches, min_seconds: float = 0.5, min_batches: int = 5) -> float:
    """Tokens/s of pulling host batches from `batches` alone (no device transfer, no step)."""
    tokens, count = 0, 0
    start = time.perf_counter()
    while count < min_batches or time.perf_counter() - start < min_seconds:
        tokens += next(batches)["tokens"][:, :-1].size
        count += 1
    return tokens / (time.perf_counter() - start)


def num_threads() -> int:
    """The cores this process may run on: what XLA's CPU thread pool is sized to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def peak_memory_bytes():
    """Peak memory in use on the first device where JAX reports it (GPUs, TPUs); None on CPUs."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class CompileTimer:
    """Seconds JAX spends tracing, lowering and compiling while it is active (its own monitoring events)."""

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **kwargs):
        del kwargs
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def blocks_of(total: int, num_blocks: int) -> list:
    """`total` steps split into `num_blocks` nearly equal blocks."""
    num_blocks = max(1, min(num_blocks, total))
    return [total // num_blocks + (i < total % num_blocks) for i in range(num_blocks)]


def summary(times: list, tokens_per_step: int) -> dict:
    times = np.asarray(times)
    median = float(np.median(times))
    return {"step_time_median_s": median,
            "step_time_spread": {"p10_s": float(np.percentile(times, 10)), "p90_s": float(np.percentile(times, 90))},
            "tokens_per_s": tokens_per_step / median}


class TimedSteps:
    """Runs `step()` (one training step to completion, returning its seconds) and keeps the times."""

    times: list

    def step(self) -> float:
        raise NotImplementedError

    def run(self, count: int, record: bool = True) -> None:
        for _ in range(count):
            elapsed = self.step()
            if record:
                self.times.append(elapsed)


class JaxSteps(TimedSteps):
    """gptlab's compiled train step on the prefetched pipeline, timed per step to completion."""

    def __init__(self, state, train_step, batches):
        self.state, self.train_step, self.batches = state, train_step, batches
        self.times = []

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.train_step(self.state, next(self.batches))
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


class TorchSteps(TimedSteps):
    """The PyTorch peer: transformers' GPT2LMHeadModel with the same shapes, batch, optimizer and precision."""

    def __init__(self, config, model_cfg, host_batches: list, threads: int):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise UserError(f"--compare=torch needs PyTorch and transformers ({e}): pip install -e '.[bench]'") from None
        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        # Same precision as gptlab: float32 parameters, compute in model.dtype (bf16 autocast on a GPU).
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_cfg.dtype)
        if self.autocast_dtype is not None and not on_gpu:
            self.autocast_dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else None
        hf_config = transformers.GPT2Config(
            vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size, n_embd=model_cfg.n_embd,
            n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
            tie_word_embeddings=model_cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
            attn_implementation="sdpa")
        self.model = (hf_llama.transformers_model(model_cfg) if hf_llama.is_llama_style(model_cfg)  # same architecture
                      else transformers.GPT2LMHeadModel(hf_config)).to(self.device).train()
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        self.grad_clip_norm = opt.grad_clip_norm
        self.batches = [torch.from_numpy(np.asarray(b["tokens"], np.int64)).to(self.device) for b in host_batches]
        self.index = 0
        self.times = []

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def step(self) -> float:
        torch = self.torch
        tokens = self.batches[self.index % len(self.batches)]
        self.index += 1
        self._sync()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start


def run(config, steps: int, warmup: int = 3, synthetic: bool = False, compare: str = "", blocks: int = 4,
        log=print) -> dict:
    """Measures `steps` timed train steps (after `warmup` untimed ones); returns one flat-ish dict.

    With `compare="torch"` the torch peer runs `warmup` + `steps` steps too, and the
    timed steps of both alternate in `blocks` blocks.
    """
    if steps < 1:
        raise UserError(f"--steps={steps} must be positive")
    if warmup < 0:
        raise UserError(f"--warmup={warmup} must be >= 0")
    if compare not in COMPARE:
        raise UserError(f"--compare={compare!r} is not one of {COMPARE[1:]} (or empty for none)")
    if blocks < 1:
        raise UserError(f"--blocks={blocks} must be positive")
    train.check_train_config(config)
    train.enable_compilation_cache(config.train.get("compilation_cache_dir"))  # as training does
    seq_len = train.resolve_seq_len(config)
    data = SyntheticData(config, seq_len) if synthetic else pipeline.Data(
        config.data, seq_len, config.seed, None, jax.process_index(), jax.process_count(), log=log)
    exp = train.pretrain_experiment(config, data, log)
    model_cfg = train.resolve_model_config(config, exp.tokenizer)
    parallel = parallel_lib.Parallel(config.parallel, config.data.batch_size, config.train.grad_accum_steps, log)

    host_batches = [next(exp.batches) for _ in range(4)]  # also the torch peer's batches
    pipeline_rate = pipeline_tokens_per_s(exp.batches)

    state, train_step, _ = train.init_and_compile(config, exp, parallel)
    batches = train.prefetched(config, exp.batches, parallel)
    try:
        jax_steps = JaxSteps(state, train_step, batches)
        with CompileTimer() as compiling:
            first_step_s = jax_steps.step()  # traces, compiles and runs the step once
        jax_steps.run(warmup, record=False)
        torch_steps = None
        if compare == "torch":
            torch_steps = TorchSteps(config, model_cfg, host_batches, num_threads())
            torch_steps.run(1 + warmup, record=False)
        for block in blocks_of(steps, blocks if torch_steps else 1):
            jax_steps.run(block)
            if torch_steps:
                torch_steps.run(block)
    finally:
        if batches is not exp.batches:
            batches.close()

    tokens_per_step = config.data.batch_size * seq_len
    result = summary(jax_steps.times, tokens_per_step)
    peak, peak_source = perf.peak_tflops(config.train.peak_tflops)
    model_tflops = result["tokens_per_s"] * exp.flops_per_token / 1e12
    device = jax.devices()[0]
    result = {
        "preset": config.get("preset"),
        "device": f"{device.platform}:{device.device_kind}",
        "num_devices": jax.device_count(),
        "threads": num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "data": "synthetic" if synthetic else config.data.dataset,
        "model": {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd,
                  "block_size": model_cfg.block_size, "vocab_size": model_cfg.vocab_size, "dtype": model_cfg.dtype,
                  "attention": model_cfg.attention, "remat": model_cfg.remat, "dropout": model_cfg.dropout},
        "batch_size": config.data.batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "warmup": warmup,
        "compile_s": compiling.seconds,  # tracing, lowering and XLA compilation of the train step
        "first_step_s": first_step_s,  # the first call: compiling plus one step
        **result,
        "flops_per_token": exp.flops_per_token,
        "model_tflops_per_s": model_tflops,
        "mfu": model_tflops / (peak * jax.device_count()),
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "peak_memory_bytes": peak_memory_bytes(),
        "pipeline_tokens_per_s": pipeline_rate,
        "pipeline_over_training": pipeline_rate / result["tokens_per_s"],
    }
    if torch_steps:
        peer = summary(torch_steps.times, tokens_per_step)
        result.update({f"torch_{k}": v for k, v in peer.items()})
        result["torch_peer"] = (f"transformers {type(torch_steps.model).__name__} (sdpa), torch {torch_steps.torch.__version__}, "
                                f"AdamW, {torch_steps.autocast_dtype or 'float32'} on {torch_steps.device.type}, "
                                f"{torch_steps.torch.get_num_threads()} threads"
                                + ("" if model_cfg.bias else ", with biases (GPT-2 always has them)"))
        result["ratio_vs_torch"] = result["tokens_per_s"] / peer["tokens_per_s"]
    return result
