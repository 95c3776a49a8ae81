"""Where a CPU train step's time goes, gptlab's against the nanoGPT-style PyTorch peer's, by component.

    python dev/step_breakdown.py [baby|small|PRESET] [STEPS]      # default: baby, 4 profiled steps

`experiments.benchmark --compare=nanogpt` says which is faster; this says where. Both steps are
profiled (gptlab's with `jax.profiler`, its XLA ops read back from the trace and named by the
compiled program's op names; the peer's with `torch.profiler`, in a process of its own as the
benchmark runs it) and their time a step is put into the same components: dense-layer matmuls
(with their backward's transposes and the head), attention, GELU, LayerNorm, the optimizer (with
gradient clipping), other ops (embeddings, loss, residual adds, copies), waiting for the other
devices (gptlab's gradient all-reduce), and the rest of the wall time (dispatch, Python, idle).
gptlab's devices run at once, one thread each (`parallel.cpu_devices`), so its figures are per
device thread, averaged over the devices: each is a share of the same wall time. `baby` is
nanoGPT's baby GPT as in the README's speed tables (synthetic tokens); a preset name takes the
preset as it is. For a GPU's kernels, `dev/step_kernels.py`.
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_kernels  # noqa: E402
from configs import pretrain  # noqa: E402

COMPONENTS = ("dense matmuls", "attention", "GELU", "LayerNorm", "optimizer", "other ops", "waiting for devices",
              "rest of the wall time")
DENSE_LAYERS = re.compile(r"/(attn/qkv|attn/proj|mlp/fc|mlp/proj|mlp/gate|lm_head)/|/wte/")


def get_config(shapes: str):
    """A preset's config, or with `baby` nanoGPT's baby GPT as docs/speed.md's tables run it."""
    if shapes != "baby":
        config = pretrain.get_config(shapes)
        if config.data.tokenizer == "char" and not config.model.vocab_size:
            config.model.vocab_size = 65  # synthetic tokens: the vocabulary of nanoGPT's Shakespeare characters
        return config
    config = pretrain.get_config("shakespeare_char")  # nanoGPT's baby GPT, as dev/speed_table.sh runs it
    config.model.dtype, config.model.dropout = "float32", 0.0
    config.data.batch_size, config.model.vocab_size = 16, 65
    return config


def xla_component(event: str, op_name: str) -> str:
    """The component of one XLA op of the train step, from its event name and HLO op name."""
    if event.startswith("all-"):
        return "waiting for devices"
    if "GPT" not in op_name:  # outside the model's forward and backward
        return "other ops" if "jvp(" in op_name else "optimizer"
    if DENSE_LAYERS.search(op_name + "/"):
        return "dense matmuls"
    for part, component in (("/attn/", "attention"), ("/mlp/", "GELU"), ("/ln_", "LayerNorm")):
        if part in op_name:
            return component
    return "other ops"


def torch_component(name: str, in_optimizer: bool) -> str:
    if in_optimizer:
        return "optimizer"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "dense matmuls"
    for part, component in (("scaled_dot_product", "attention"), ("gelu", "GELU"), ("layer_norm", "LayerNorm")):
        if part in name:
            return component
    return "other ops"


def gptlab_breakdown(shapes: str, steps: int) -> tuple:
    """(wall seconds a step, {component: seconds a step per device thread}) of gptlab's train step."""
    import jax

    from gptlab import benchmark

    config = get_config(shapes)
    par, state, train_step, batches = benchmark.synthetic_train_step(config, lambda line: None)
    # The op names of the program that runs: the same lowering and compile options as the step's.
    with jax.set_mesh(par.mesh):
        hlo = train_step.jitted.lower(state, par.place_batch(next(batches))).compile().as_text()
    op_names = dict(re.findall(r'^\s+%(\S+) = .*?op_name="([^"]*)"', hlo, re.M))
    _, wall, planes = step_kernels.profiled_steps(state, train_step, batches, steps,
                                                  tempfile.mkdtemp(prefix="step_breakdown_"), python_tracer=False)
    per_thread = []
    for plane in planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            times = collections.Counter()
            for event in line.events:
                if event.name in op_names or event.name.startswith("all-"):  # ops, not the executor's spans
                    times[xla_component(event.name, op_names.get(event.name, ""))] += event.duration_ns / 1e9 / steps
            if sum(times.values()) > 0.1 * wall:  # the devices' threads
                per_thread.append(times)
    threads = max(len(per_thread), 1)
    average = {c: sum(t[c] for t in per_thread) / threads for c in COMPONENTS[:-1]}
    average["rest of the wall time"] = wall - sum(average.values())
    return wall, average


def torch_breakdown(shapes: str, steps: int) -> tuple:
    """(wall seconds a step, {component: seconds a step}) of the nanoGPT-style peer, in this process."""
    import numpy as np

    from gptlab import benchmark, perf
    from gptlab import experiment as experiment_lib

    config = get_config(shapes)
    perf.resolve_auto(config, lambda line: None)  # the model's fields as training resolves them (shapes only here)
    data = benchmark.SyntheticData(config, experiment_lib.resolve_seq_len(config))
    model_cfg = experiment_lib.resolve_model_config(config, data.tokenizer)
    batches = [next(data.train) for _ in range(4)]
    peer = benchmark.TorchSteps("nanogpt", config, model_cfg, batches, benchmark.num_threads())
    torch = peer.torch
    optimizer_step = peer.optimizer.step
    peer.optimizer.step = lambda: _scoped(torch, optimizer_step)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda *a, **k: _scoped(torch, lambda: clip(*a, **k))
    peer.run(3, record=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        wall = float(np.sum([peer.step() for _ in range(steps)])) / steps
    times = collections.Counter()
    for event in profile.events():
        if event.name == "optimizer":
            continue
        parent, in_optimizer = event.cpu_parent, False
        while parent is not None and not in_optimizer:
            in_optimizer, parent = parent.name == "optimizer", parent.cpu_parent
        times[torch_component(event.name, in_optimizer)] += event.self_cpu_time_total / 1e6 / steps
    result = {c: times[c] for c in COMPONENTS[:-2]}
    result["waiting for devices"] = 0.0
    result["rest of the wall time"] = wall - sum(result.values())
    return wall, result


def _scoped(torch, fn):
    with torch.profiler.record_function("optimizer"):
        return fn()


def main(shapes="baby", steps=4):
    # The peer first, in a process of its own (nothing of gptlab's process settings reaches it).
    child = subprocess.run([sys.executable, __file__, "--torch", shapes, str(steps)], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"step_breakdown.py: the PyTorch peer failed:\n{child.stderr[-2000:]}")
    torch_wall, torch_times = json.loads(child.stdout.strip().splitlines()[-1])
    wall, times = gptlab_breakdown(shapes, steps)
    from gptlab import tables  # after gptlab_breakdown, as every gptlab import here
    print(f"{shapes}: a step's time by component, ms ({steps} steps under each profiler; gptlab per device thread)")
    rows = [[component, f"{times[component] * 1e3:.0f}", f"{torch_times[component] * 1e3:.0f}"] for component in COMPONENTS]
    rows.append(["**wall time a step**", f"**{wall * 1e3:.0f}**", f"**{torch_wall * 1e3:.0f}**"])
    print("\n".join(tables.markdown(["component", "gptlab", "nanoGPT-style peer"], rows)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--torch"]:
        print(json.dumps(torch_breakdown(sys.argv[2], int(sys.argv[3]))))
    else:
        from gptlab import heap

        heap.restart_with_tcache_off()  # as `python -m experiments.NAME` does (the peer's process inherits it)
        main(*(sys.argv[1:2] or ["baby"]), *map(int, sys.argv[2:3]))
