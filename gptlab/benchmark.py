"""Training speed of the real train step: compile time, step time, tokens/s, MFU, and a PyTorch peer.

`run(config, steps, ...)` builds the experiment exactly as pretraining does
(`experiment_lib.pretrain_experiment`, `experiment_lib.init_and_compile`, `experiment_lib.prefetched`), so the
timed function is the compiled step the loop runs, fed by the real input pipeline
or, with `synthetic=True`, by random tokens (no dataset is prepared or read).

With `compare="torch"`, two PyTorch peers of the same shapes (`gptlab.torch_peers`:
Hugging Face transformers' `GPT2LMHeadModel` and a nanoGPT-style eager model) train on
the same batches with AdamW at the same precision, timed the same way, in blocks that
alternate with gptlab's, so that noise from a shared machine falls on all alike
(`compare="transformers"` or `"nanogpt"`: one of them). Each peer runs in a fresh process
of its own (`PeerProcess`), as PyTorch users run it: nothing gptlab sets for its process
reaches it. PyTorch is imported only there.

The config's automatic speed settings are resolved once, in `start_run`, as
training resolves them (`gptlab.train.start`), so the defaults are what is timed. `sampling(...)` times
`gptlab.sampling.generate` against Hugging Face `generate` with its cache.
"""
import os
import re
import time

import jax
import numpy as np

from gptlab import heap
from gptlab import parallel as parallel_lib
from gptlab import peak as peak_lib
from gptlab import perf
from gptlab import experiment as experiment_lib
from gptlab.data import pipeline
from gptlab.errors import UserError

COMPARE = ("", "torch", "transformers", "nanogpt")  # torch: both PyTorch peers


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
    """What `experiment_lib.pretrain_experiment` needs from `pipeline.Data`, without any dataset."""

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


def _status_bytes(field: str):
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _release_free_memory() -> None:
    """Hands memory the C allocator holds but nothing uses back to the kernel (glibc), so that
    what the next code allocates shows in the resident size instead of reusing freed pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """The process's peak resident memory (Linux VmHWM) over a stretch of code, above where it began.

    `start()` resets the high-water mark to the current resident size (/proc/self/clear_refs);
    `increase()` is the peak since then minus that size: what the code in between needed
    at its peak (model, optimizer state, activations, and for JAX the compiled program).
    None where the kernel offers no reset (not Linux).
    """

    def __init__(self):
        self.base = None

    def start(self) -> None:
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return
        self.base = _status_bytes("VmRSS")

    def increase(self):
        peak = _status_bytes("VmHWM")
        return None if self.base is None or peak is None else peak - self.base

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
    # The mean counts the occasional slow step (a heap that grows, a checkpoint) the median leaves out.
    return {"step_time_median_s": median, "step_time_mean_s": float(np.mean(times)),
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


def start_run(config, log=print) -> dict:
    """As `gptlab.train.start` for a benchmark, the one place its "auto" fields are resolved (in place, logged);
    returns what was chosen, {field: (value, why)}. Call first, before anything starts JAX's backend."""
    perf.start_cpu_devices(config)  # before anything starts JAX's backend, as training does
    experiment_lib.check_train_config(config)
    return perf.resolve_auto(config, log)


def synthetic_experiment(config, log=print) -> tuple:
    """(experiment, parallel): the config resolved and assembled as training does it, on synthetic tokens.

    For tools that swap a piece of the experiment before compiling (`dev/loss_ab.py`).
    """
    start_run(config, log)
    exp = experiment_lib.pretrain_experiment(config, SyntheticData(config, experiment_lib.resolve_seq_len(config)), log)
    parallel = parallel_lib.Parallel(config.parallel, config.data.batch_size, config.train.grad_accum_steps, log)
    return exp, parallel


def synthetic_train_step(config, log=print) -> tuple:
    """(parallel, state, train_step, batches): the config's compiled train step on synthetic tokens.

    Resolved and compiled as training does it, for tools and tests that time or compare the step
    itself (`dev/compile_options_ab.py`); `run` builds the same around its memory measurement.
    """
    exp, parallel = synthetic_experiment(config, log)
    state, train_step, _ = experiment_lib.init_and_compile(config, exp, parallel, log)
    return parallel, state, train_step, experiment_lib.prefetched(config, exp.batches, parallel)


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


def import_torch_peers():
    """Imports PyTorch and transformers (so that their import is not counted as a peer's memory)."""
    try:
        import transformers

        from gptlab import torch_peers
    except ImportError as e:
        raise UserError(f"--compare needs PyTorch and transformers ({e}): pip install -e '.[bench]'") from None
    transformers.GPT2LMHeadModel  # noqa: B018  # transformers imports its model modules lazily
    torch = torch_peers.torch
    x = torch.ones(8, 8, requires_grad=True)  # starts PyTorch's thread pools and autograd engine
    torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]).sum().backward()
    return torch_peers


class TorchSteps(TimedSteps):
    """A PyTorch peer (`gptlab.torch_peers`) with the same shapes, batch, optimizer and precision."""

    def __init__(self, peer: str, config, model_cfg, host_batches: list, threads: int, compile_model: bool = False):
        torch_peers = import_torch_peers()
        torch = torch_peers.torch
        self.torch, self.peer = torch, peer
        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        # Same precision as gptlab: float32 parameters, compute in model.dtype (bf16 autocast on a GPU).
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_cfg.dtype)
        if self.autocast_dtype is not None and not on_gpu:
            self.autocast_dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else None
        self.model, self.logits = torch_peers.build(peer, model_cfg, self.device)
        self.description = torch_peers.describe(peer, model_cfg)
        if compile_model:  # compiled at the first (untimed) step
            self.logits = torch.compile(self.logits)
            self.description += ", torch.compile"
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
            logits = self.logits(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start

    def summary_line(self) -> str:
        torch = self.torch
        return (f"{self.description}, torch {torch.__version__}, AdamW, {self.autocast_dtype or 'float32'} on "
                f"{self.device.type}, {torch.get_num_threads()} threads")


def _serve_peer(conn, peer: str, config, model_cfg, host_batches: list, threads: int, compile_model: bool,
                warmup: int) -> None:
    """A PyTorch peer in its own process: builds it, warms it up, then runs the steps it is sent."""
    memory = PeakRSS()
    import_torch_peers()
    memory.start()
    timed = TorchSteps(peer, config, model_cfg, host_batches, threads, compile_model)
    timed.run(1 + warmup, record=False)
    conn.send({"memory": memory.increase(), "summary": timed.summary_line()})
    while (count := conn.recv()) is not None:
        timed.run(count)
        conn.send(timed.times[-count:])


class PeerProcess(TimedSteps):
    """A PyTorch peer timed in a fresh process of its own (`_serve_peer`), as its users run it.

    So nothing gptlab sets for its own process (the C allocator's settings,
    `parallel.cpu_reuse_memory`, the glibc tcache setting `python -m experiments.NAME` restarts
    with) reaches the peer, and the peer's peak memory is its own.
    """

    def __init__(self, peer: str, config, model_cfg, host_batches: list, threads: int, compile_model: bool,
                 warmup: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a new interpreter: none of this process's state
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve_peer, daemon=True, args=(
            child, peer, config, model_cfg, host_batches, threads, compile_model, warmup))
        with heap.environment_as_started():
            self.process.start()
        child.close()
        ready = self._receive()
        self.memory, self.description = ready["memory"], ready["summary"]
        self.times = []

    def _receive(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the PyTorch peer's process ended (exit code {self.process.exitcode}); "
                               "its error is above") from None

    def run(self, count: int, record: bool = True) -> None:
        self.conn.send(count)
        times = self._receive()
        if record:
            self.times.extend(times)

    def summary_line(self) -> str:
        return self.description + ", own process"

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run(config, steps: int, warmup: int = 3, synthetic: bool = False, compare: str = "", blocks: int = 4,
        log=print, torch_compile: bool = False) -> dict:
    """Measures `steps` timed train steps (after `warmup` untimed ones); returns one flat-ish dict.

    With `compare` the PyTorch peers run `1 + warmup` + `steps` steps too, and the
    timed steps of all alternate in `blocks` blocks (`torch_compile`: the peers' models under
    `torch.compile`, the fair peer on a GPU). At least one untimed step follows
    the compiling one (it measures the step's memory).
    """
    if steps < 1:
        raise UserError(f"--steps={steps} must be positive")
    if warmup < 0:
        raise UserError(f"--warmup={warmup} must be >= 0")
    if compare not in COMPARE:
        raise UserError(f"--compare={compare!r} is not one of {COMPARE[1:]} (or empty for none)")
    if blocks < 1:
        raise UserError(f"--blocks={blocks} must be positive")
    if compare:
        # The PyTorch peers train on the same GPU in processes of their own, alongside this one: JAX's
        # default preallocation (75% of the GPU's memory) would leave them too little (seen on an H200).
        # Set before anything starts JAX's backend; an explicit setting of the user's is kept.
        if not ({"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(os.environ)):
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.3"
    auto = start_run(config, log)
    experiment_lib.enable_compilation_cache(config.train.get("compilation_cache_dir"))  # as training does
    seq_len = experiment_lib.resolve_seq_len(config)
    data = SyntheticData(config, seq_len) if synthetic else pipeline.Data(
        config.data, seq_len, config.seed, None, jax.process_index(), jax.process_count(), log=log)
    exp = experiment_lib.pretrain_experiment(config, data, log)
    model_cfg = experiment_lib.resolve_model_config(config, exp.tokenizer)
    parallel = parallel_lib.Parallel(config.parallel, config.data.batch_size, config.train.grad_accum_steps, log)

    host_batches = [next(exp.batches) for _ in range(4)]  # also the torch peers' batches
    pipeline_rate = pipeline_tokens_per_s(exp.batches)

    memory = PeakRSS()
    memory.start()
    state, train_step, _ = experiment_lib.init_and_compile(config, exp, parallel, log)
    batches = experiment_lib.prefetched(config, exp.batches, parallel)
    peers = {"torch": ("transformers", "nanogpt"), "": ()}.get(compare, (compare,))
    peer_steps, peer_memory = {}, {}
    try:
        jax_steps = JaxSteps(state, train_step, batches)
        with CompileTimer() as compiling:
            first_step_s = jax_steps.step()  # traces, compiles and runs the step once
        base = memory.base
        memory.start()  # the steady steps' peak, above the size before the state was built
        memory.base = base
        jax_steps.run(max(1, warmup), record=False)
        jax_memory = memory.increase()
        for peer in peers:  # each in a process of its own, its memory above what was there before it
            peer_steps[peer] = PeerProcess(peer, config, model_cfg, host_batches, num_threads(), torch_compile, warmup)
            peer_memory[peer] = peer_steps[peer].memory
        for block in blocks_of(steps, blocks if peers else 1):
            jax_steps.run(block)
            for timed in peer_steps.values():
                timed.run(block)
    finally:
        for timed in peer_steps.values():
            timed.close()
        if batches is not exp.batches:
            batches.close()

    if "parallel.cpu_reuse_memory" in auto:  # as the first step settled it (perf.limit_reuse_memory)
        auto["parallel.cpu_reuse_memory"] = perf.reuse_memory_choice()
    tokens_per_step = config.data.batch_size * seq_len
    result = summary(jax_steps.times, tokens_per_step)
    peak, peak_source = peak_lib.total_peak_tflops(config.train.peak_tflops)
    model_tflops = result["tokens_per_s"] * exp.flops_per_token / 1e12
    device = jax.devices()[0]
    result = {
        "preset": config.get("preset"),
        "device": f"{device.platform}:{device.device_kind}",
        "cpu": perf.cpu_description(),
        "num_devices": jax.device_count(),
        "threads": num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "auto": {field: value for field, (value, _) in auto.items()},  # what perf.resolve_auto chose, as it ran
        "data": "synthetic" if synthetic else config.data.dataset,
        "model": {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd,
                  "block_size": model_cfg.block_size, "vocab_size": model_cfg.vocab_size, "dtype": model_cfg.dtype,
                  "attention": model_cfg.attention, "dense_backward": config.model.dense_backward,
                  "remat": model_cfg.remat, "dropout": model_cfg.dropout},
        "prefetch": config.data.prefetch,
        "batch_size": config.data.batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "warmup": warmup,
        "compile_s": compiling.seconds,  # tracing, lowering and XLA compilation of the train step
        "first_step_s": first_step_s,  # the first call: compiling plus one step
        **result,
        "flops_per_token": exp.flops_per_token,
        "model_tflops_per_s": model_tflops,
        "mfu": model_tflops / peak,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_rss_increase_bytes": jax_memory,
        "pipeline_tokens_per_s": pipeline_rate,
        "pipeline_over_training": pipeline_rate / result["tokens_per_s"],
    }
    for peer, timed in peer_steps.items():
        prefix = "torch" if peer == "transformers" else peer  # torch_*: the transformers peer, as before
        peer_result = summary(timed.times, tokens_per_step)
        result.update({f"{prefix}_{k}": v for k, v in peer_result.items()})
        result[f"{prefix}_peer"] = timed.summary_line()
        result[f"{prefix}_peak_rss_increase_bytes"] = peer_memory[peer]
        result[f"ratio_vs_{prefix}"] = result["tokens_per_s"] / peer_result["tokens_per_s"]
        result[f"ratio_vs_{prefix}_by_mean"] = peer_result["step_time_mean_s"] / result["step_time_mean_s"]
    return result


def sampling(config, batch_sizes=(1, 8), prompt_len: int = 16, new_tokens: int = 128, compare: bool = True,
             repeats: int = 2, log=print) -> dict:
    """Tokens/s of `gptlab.sampling.generate` (greedy, cache) with the config's model, randomly initialised,
    and, with `compare`, of Hugging Face `generate` (cache) for GPT2LMHeadModel of the same shapes.

    Every row produces exactly `new_tokens` (no end token); best of `repeats` after a compiling call.
    """
    from gptlab import model as model_lib
    from gptlab import sampling as sampling_lib

    start_run(config, log)
    vocab_size = synthetic_vocab_size(config)
    model_cfg = experiment_lib.resolve_model_config(config, SyntheticTokenizer(vocab_size))
    if prompt_len + new_tokens > model_cfg.block_size:
        raise UserError(f"--sample_prompt_len={prompt_len} + --sample_new_tokens={new_tokens} exceeds the context "
                        f"model.block_size={model_cfg.block_size}: lower them")
    params = model_lib.init_params(model_cfg, jax.random.key(config.seed))
    rng = np.random.default_rng(config.seed)
    result = {"sample_prompt_len": prompt_len, "sample_new_tokens": new_tokens}
    for batch in batch_sizes:
        prompts = rng.integers(0, vocab_size, (batch, prompt_len)).tolist()
        best = float("inf")
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = sampling_lib.generate(params, model_cfg, prompts, new_tokens, temperature=0.0, seed=config.seed)
            elapsed = time.perf_counter() - start
            assert all(len(row) == new_tokens for row in out)
            if i:
                best = min(best, elapsed)
        result[f"sample_tokens_per_s_batch{batch}"] = batch * new_tokens / best
        if compare:
            hf = import_torch_peers().hf_generate(model_cfg, batch, prompt_len, new_tokens, num_threads(), repeats,
                                         config.seed)
            result[f"hf_sample_tokens_per_s_batch{batch}"] = hf
            result[f"sample_ratio_vs_hf_batch{batch}"] = result[f"sample_tokens_per_s_batch{batch}"] / hf
        log(f"sampling batch {batch}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result.items() if k.endswith(f"batch{batch}")))
    return result
