"""Running a sweep's cells: local processes or submitit jobs, a few at a time, resumable, stoppable."""
import contextlib
import datetime
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Optional


from gptlab import lock as lock_lib
from gptlab import results
from gptlab.errors import Preempted, UserError


from gptlab.sweep.spec import REPO, Cell, Sweep, SweepInterrupted, build_config, cell_from_json, counts_text, run_dir
from gptlab.sweep.store import (TERMINAL, cell_state, check_workdir, collect, count_statuses, finished_result,
                                first_error_only, gate, group_choice, has_checkpoint, quote_arg, read_json, verdict,
                                write_json, write_sweep_json)

EXECUTORS = ("local", "submitit_local", "slurm")  # local: processes of this machine, without submitit
SUBMITIT_DEFAULTS = {"timeout_min": 24 * 60}  # submitit's own default (5 minutes locally) would stop long cells


def make_executor(kind: str, folder, parameters: dict):
    """A submitit executor for `kind` ("submitit_local" or "slurm") with `parameters` (submitit's
    AutoExecutor names: timeout_min, gpus_per_node, cpus_per_task, mem_gb, slurm_partition, ...)."""
    if kind == "local":
        if parameters:
            raise UserError("--submitit=... needs --executor=slurm or --executor=submitit_local")
        return None
    try:
        import submitit
    except ImportError:
        raise UserError(f'--executor={kind} needs submitit: pip install -e ".[cluster]"') from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if kind == "submitit_local" else "slurm")
    except RuntimeError as e:  # no SLURM here ("Could not detect srun")
        raise UserError(f"--executor={kind}: {e}; run the sweep on a SLURM login node, or use --executor=local") from None
    try:
        executor.update_parameters(**{**SUBMITIT_DEFAULTS, **parameters})
    except (ValueError, TypeError, NameError, AssertionError) as e:  # submitit: unknown or mistyped parameters
        raise UserError(f"--submitit: {str(e).splitlines()[0]} (the generic ones: timeout_min, mem_gb, "
                        "cpus_per_task, gpus_per_node, nodes, tasks_per_node; SLURM's: slurm_partition, ...)") from None
    return executor


def run_cell(command: list, log_path: str, lock_path: str, env: dict) -> int:
    """A cell's job on its node: runs `command` in the repository holding the cell's lock; returns its exit status.

    SIGTERM and SIGUSR2 (submitit's preemption/timeout signal) become one SIGTERM to the cell,
    which saves a checkpoint and exits with Preempted.EXIT_CODE; a second one stops it at once.
    """
    try:
        lock = lock_lib.FileLock(pathlib.Path(lock_path))
    except OSError:
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"error: another process is running this cell (pid in {lock_path})\n")
        return 1
    try:
        cell_json = read_json(pathlib.Path(lock_path).parent / "sweep_cell.json") or {}
        if (pathlib.Path(lock_path).parent / results.FILENAME).exists() and cell_json.get("name") and \
                finished_result(pathlib.Path(lock_path).parents[2], cell_from_json(cell_json))[0] is not None:
            return 0  # a job that was queued twice (a sweep restarted meanwhile): the cell already finished
        with open(log_path, "ab") as out:
            process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env={**os.environ, **env})
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, str(process.pid).encode(), 0)  # the sweep signals it through this pid (same machine)
        forward = lambda signum, frame: process.send_signal(signal.SIGTERM)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
        try:
            return process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        lock.release()


class _Job:
    """A cell submitted through submitit, with the part of subprocess.Popen's interface the runner uses."""

    def __init__(self, job, lock_path: pathlib.Path, on_slurm: bool):
        self.job, self.lock_path, self.on_slurm = job, lock_path, on_slurm
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.job.done():
            try:
                self.returncode = int(self.job.result())
            except Exception:  # pylint: disable=broad-except  # cancelled, killed, or lost by the scheduler
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self):
        while self.poll() is None:
            time.sleep(0.5)
        return self.returncode

    def send_signal(self, sig) -> None:
        """Asks the cell to stop at a checkpoint (a job still queued is cancelled)."""
        if self.on_slurm and self.job.state not in ("PENDING", "REQUEUED"):
            subprocess.call(["scancel", f"--signal={signal.Signals(sig).name[3:]}", str(self.job.job_id)])
            return
        pid = _read_pid(self.lock_path) if not self.on_slurm else None
        if pid is not None and lock_lib.is_locked(self.lock_path):
            os.kill(pid, sig)
        else:
            self.job.cancel(check=False)

    def kill(self) -> None:
        pid = None if self.on_slurm else _read_pid(self.lock_path)
        if pid is not None and lock_lib.is_locked(self.lock_path):
            os.kill(pid, signal.SIGKILL)
        self.job.cancel(check=False)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _read_pid(path: pathlib.Path):
    return lock_lib.read_holder(path).get("pid")


class Runner:
    """Runs a sweep's cells: in order (or `parallel` at once), skipping finished ones, recording every outcome.

    `executor`: one of EXECUTORS; `submitit`: parameters of its submitit executor (`make_executor`).
    """

    def __init__(self, sweep: Sweep, workdir, parallel: int = 1, in_process: bool = False,
                 compilation_cache: Optional[str] = None, log: Callable = print, executor: str = "local",
                 submitit: Optional[dict] = None):
        if parallel < 1:
            raise UserError(f"--parallel={parallel} must be at least 1")
        if executor not in EXECUTORS:
            raise UserError(f"--executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
        if in_process and (parallel != 1 or executor != "local"):
            raise UserError("--in_process runs one cell at a time in this process: drop --parallel, --executor "
                            "or --in_process")
        self.sweep, self.parallel, self.in_process = sweep, parallel, in_process
        self.executor_kind, self.submitit, self.executor = executor, dict(submitit or {}), None
        self.workdir = pathlib.Path(workdir).expanduser().absolute()
        self.compilation_cache = compilation_cache
        self._print = log
        self.stopping = False
        self.signals = 0
        self.running = {}  # name -> (process, lock, started, log offset)

    def log(self, message: str) -> None:
        self._print(message)
        try:
            with open(self.workdir / "sweep.log", "a", encoding="utf-8") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
        except OSError:
            pass  # a copy of what was printed: a full disk is reported by the writes of the sweep's state

    # -- the whole sweep --

    def run(self, only: Optional[str] = None) -> dict:
        check_workdir(self.workdir, self.sweep)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "runs").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to --workdir={self.workdir} ({e.strerror or e}): choose a directory "
                            "you can write to") from None
        try:
            lock = lock_lib.FileLock(self.workdir / ".sweep.lock")
        except OSError:
            raise UserError(f"another sweep is running in {self.workdir} (pid in {self.workdir / '.sweep.lock'}): "
                            "wait for it to finish or stop it") from None
        try:
            write_sweep_json(self.workdir, self.sweep)
            self.executor = make_executor(self.executor_kind, self.workdir / "submitit", self.submitit)
            return self._run_locked(only)
        except OSError as e:  # a full disk or lost permissions in the sweep's own files (every write is atomic)
            raise UserError(f"could not write {e.filename or self.workdir} ({e.strerror or e}): finished cells and "
                            "their results are kept; free disk space (or fix the permissions) and rerun the same "
                            "command to go on") from None
        finally:
            lock.release()

    def _selected(self, only: Optional[str]) -> list:
        if not only:
            return list(self.sweep.cells)
        try:
            pattern = re.compile(only)
        except re.error as e:
            raise UserError(f"--only={only!r} is not a valid regex ({e})") from None
        wanted = {c.name for c in self.sweep.cells if pattern.search(c.name)}
        if not wanted:
            raise UserError(f"--only={only!r} matches no cell: list them with --dry_run")
        for cell in reversed(self.sweep.cells):  # dependencies, and the cells a choice is made on, come along
            if cell.name in wanted and cell.waits_for_choice:
                wanted.update(c.name for c in self.sweep.cells if c.choice and c.seed == cell.choice["on_seed"]
                              and c.choice["group"] == cell.choice["group"])
        for cell in reversed(self.sweep.cells):
            if cell.name in wanted and cell.depends_on:
                wanted.add(cell.depends_on)
        return [c for c in self.sweep.cells if c.name in wanted]

    def plan(self, only: Optional[str] = None) -> list:
        """(cell, state) for the selected cells: what a run would do (a cell its group's choice passed over: skipped)."""
        cells = self._selected(only)
        states = {c.name: cell_state(self.workdir, c) for c in (self.sweep.cells if any(c.choice for c in cells)
                                                                 else cells)}
        choices = {}
        for cell in cells:
            if cell.choice is not None:
                group = cell.choice["group"]
                if group not in choices:
                    choices[group] = group_choice(self.workdir, self.sweep, group, states)
                states[cell.name] = gate(cell, choices[group], states[cell.name])
        return [(cell, states[cell.name]) for cell in cells]

    def _run_locked(self, only) -> dict:
        cells = self._selected(only)
        states = collect(self.workdir, self.sweep)
        for cell in cells:  # a child of a killed sweep may still be running a cell
            path = run_dir(self.workdir, cell.name) / ".lock"
            if path.exists():
                try:
                    lock_lib.FileLock(path, record=False).release()
                except OSError:
                    raise UserError(f"cell {cell.name} is still being run by a process of an earlier sweep (pid in "
                                    f"{path}): wait for it to finish or stop it, then rerun") from None
        foreign = [c.name for c in cells if states[c.name]["status"] == "foreign"]
        if foreign:  # never resumed or overwritten: whose files they are is not known, so the user decides
            raise UserError(f"{len(foreign)} cell(s) hold files of another run: {foreign[0]}: "
                            f"{states[foreign[0]]['error']}; move or delete {run_dir(self.workdir, foreign[0])} "
                            "(and any other such cell) to run it here")
        todo = [c for c in cells if states[c.name]["status"] not in ("finished", "skipped")]
        self.announced = set()  # the groups whose choice was logged
        kinds = count_statuses({c.name: states[c.name] for c in cells})
        self.log(f"sweep {self.sweep.name}: {len(cells)} cells in {self.workdir} "
                 f"({counts_text(kinds)}); {len(todo)} to run, "
                 + (f"{self.parallel} at a time" if self.parallel > 1 else "one at a time")
                 + (" in this process" if self.in_process else "")
                 + (f", as {self.executor_kind} jobs through submitit" if self.executor is not None else ""))
        self.total, self.done_before = len(cells), len(cells) - len(todo)
        self.finished_now, self.seconds_now = 0, 0.0
        self.outcomes = {}
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            self._schedule(todo, states)
        except OSError:  # the sweep cannot record outcomes (a full disk): running cells checkpoint and stop
            self.stopping = True
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for name in list(self.running):  # after a second signal (they were killed) or a write error
                with first_error_only():
                    self._finish(name, interrupted=True)
            if self.outcomes:  # something ran: the sweep's record says when (a rerun that ran nothing leaves it)
                with first_error_only():
                    write_sweep_json(self.workdir, self.sweep, ran=True)
            with first_error_only():
                states = collect(self.workdir, self.sweep)
        counts = count_statuses({c.name: states[c.name] for c in cells})
        if self.stopping:
            raise SweepInterrupted(self.workdir, counts)
        self.log(f"sweep {self.sweep.name} done: {counts_text(counts)}; results in {self.workdir / 'results.jsonl'}"
                 + "; report: python -m experiments.report --workdir=" + str(self.workdir))
        for cell in cells:
            if states[cell.name]["status"] in ("failed", "blocked"):
                self.log(f"  {states[cell.name]['status']}: {cell.name}: {states[cell.name]['error']}")
        return states

    def _on_signal(self, signum, frame):
        del frame
        self.signals += 1
        if self.signals == 1:
            self.stopping = True
            self.log(f"{signal.Signals(signum).name}: stopping; running cells save a checkpoint and stop "
                     "(a second signal kills them)")
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        else:
            for process, *_ in self.running.values():
                if process.poll() is None:
                    process.kill()

    def _schedule(self, todo: list, states: dict) -> None:
        pending = list(todo)
        while pending or self.running:
            if not self.stopping:
                for cell in list(pending):
                    if len(self.running) >= self.parallel or self.stopping:
                        break
                    if cell.waits_for_choice:
                        choice = self._choice(cell, states, pending)
                        if not choice["decided"]:
                            continue
                        if verdict(cell, choice) in ("skip", "block"):
                            pending.remove(cell)
                            states[cell.name] = gated = gate(cell, choice, {**states[cell.name], "status": "pending"})
                            if gated["status"] == "blocked":
                                self._record(cell, {"status": "blocked", "error": gated["error"]})
                            else:  # not recorded in the cell's files: a later choice (a rerun) recomputes it
                                self.outcomes[cell.name] = "skipped"
                            self._progress(cell, gated)
                            continue
                    dep = cell.depends_on
                    if dep:
                        dep_status = states[dep]["status"]
                        # skipped: its stage's choice passed its value over, so it will never run
                        if dep_status in ("failed", "blocked", "skipped") and dep not in self.running and \
                                all(c.name != dep for c in pending):
                            pending.remove(cell)
                            self._record(cell, {"status": "blocked", "error": f"its init_from cell {dep} {dep_status}"})
                            states[cell.name]["status"] = "blocked"
                            self._progress(cell, states[cell.name])
                            continue
                        if dep_status != "finished":
                            continue
                    pending.remove(cell)
                    if self.in_process:
                        states[cell.name] = self._run_in_process(cell)
                    else:
                        self._start(cell)
            if not self.running and self.stopping:
                break
            for name in list(self.running):
                if self.running[name][0].poll() is not None:
                    states[name] = self._finish(name)
            if self.running:
                time.sleep(0.2)
            elif pending and not self.stopping and not self._startable(pending, states, self.running):
                # Waiting on nothing: every pending cell's dependency is neither running nor runnable.
                for cell in pending:
                    self._record(cell, {"status": "blocked", "error": (
                        f"its init_from cell {cell.depends_on} {states[cell.depends_on]['status']}" if cell.depends_on
                        else f"the cells of seed {cell.choice['on_seed']} its choice is made on did not finish")})
                    states[cell.name]["status"] = "blocked"
                    self._progress(cell, states[cell.name])
                pending = []

    def _startable(self, pending, states, running=()) -> bool:
        names = {c.name for c in pending} | set(running)
        for c in pending:
            if c.waits_for_choice:  # waits on its group's on_seed cells: still to run, or just settled (decidable)
                on_seed = self._on_seed_cells(c)
                if any(o.name in names for o in on_seed) or all(states[o.name]["status"] in TERMINAL for o in on_seed):
                    return True
                continue
            if (not c.depends_on or states[c.depends_on]["status"] == "finished" or c.depends_on in names
                    or states[c.depends_on]["status"] in ("failed", "blocked")):
                return True
        return False

    def _on_seed_cells(self, cell: Cell) -> list:
        return [c for c in self.sweep.cells if c.choice and c.choice["group"] == cell.choice["group"]
                and c.seed == cell.choice["on_seed"]]

    def _choice(self, cell: Cell, states: dict, pending: list) -> dict:
        """The choice of `cell`'s group as the stored results make it, an on_seed cell still to run (or
        running, or being retried) counting as undecided; logged once when it is made."""
        group = cell.choice["group"]
        unsettled = {c.name for c in pending} | set(self.running)
        view = {c.name: ({"status": "pending"} if c.name in unsettled else states[c.name])
                for c in self._on_seed_cells(cell)}
        choice = group_choice(self.workdir, self.sweep, group, {**states, **view})
        if choice["decided"] and group not in self.announced:
            self.announced.add(group)
            scores = ", ".join(f"{item['value']}: {item['score']:.4f}" for item in choice["scores"]) or "none"
            self.log(f"stage {choice['stage']}: {choice['key']}={choice['chosen']} chosen on seed "
                     f"{choice['on_seed']} by validation {choice['metric']} ({scores})"
                     + (", at the grid's edge" if choice["at_edge"] else "") + f" [{group}]")
        return choice

    # -- one cell --

    def _prepare(self, cell: Cell) -> tuple:
        directory = run_dir(self.workdir, cell.name)
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *cell.command(self.workdir)]
        write_json(directory / "sweep_cell.json", {**cell.to_json(), "command": command})
        state = cell_state(self.workdir, cell)
        resuming = has_checkpoint(directory)
        log_path = directory / "log.txt"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n=== sweep {self.sweep.name}, attempt {state['attempts'] + 1}, "
                    f"{datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(map(quote_arg, command))}\n")
        offset = log_path.stat().st_size
        self._record(cell, {"status": "running", "error": None, "attempts": state["attempts"] + 1,
                            "seconds": state["seconds"]})
        self.log(f"[{self._position()}] {'resuming' if resuming else 'starting'} {cell.name}")
        return directory, command, log_path, offset, state

    def _start(self, cell: Cell) -> None:
        directory, command, log_path, offset, _ = self._prepare(cell)
        cache = {}
        if self.compilation_cache and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
            # Cells of one strategy share their compiled steps (seeds and data fractions change no shapes).
            cache = dict(JAX_COMPILATION_CACHE_DIR=self.compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
        if self.executor is not None:  # the job takes the cell's lock where it runs
            job = self.executor.submit(run_cell, command, str(log_path), str(directory / ".lock"), cache)
            self._record(cell, {"status": "running", "job_id": str(job.job_id)})
            self.log(f"  submitted {cell.name} as job {job.job_id}")
            self.running[cell.name] = (_Job(job, directory / ".lock", self.executor.cluster == "slurm"), None,
                                       time.perf_counter(), offset)
            return
        lock = lock_lib.FileLock(directory / ".lock")
        env = {**os.environ, **cache}
        with open(log_path, "ab") as out:
            # Own session: a terminal's Ctrl-C reaches the sweep only, which forwards exactly one SIGTERM.
            # The child inherits the cell's lock, so a cell outliving a killed sweep is never started twice.
            process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       pass_fds=(lock.fd,))
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, str(process.pid).encode(), 0)  # who holds the cell, should the sweep die
        self.running[cell.name] = (process, lock, time.perf_counter(), offset)

    def _finish(self, name: str, interrupted: bool = False) -> dict:
        process, lock, started, offset = self.running.pop(name)
        code = process.wait()
        if lock is not None:  # a submitit job released its own
            lock.release()
        cell = self.sweep.cell(name)
        directory = run_dir(self.workdir, name)
        seconds = time.perf_counter() - started
        finished, why = finished_result(self.workdir, cell)
        if code == 0 and finished is not None:
            outcome = {"status": "finished", "error": None}
        elif code == Preempted.EXIT_CODE or (code < 0 and (self.stopping or interrupted)):
            outcome = {"status": "interrupted", "error": "stopped by a signal; rerun the sweep to resume"}
        elif code == 0:
            outcome = {"status": "failed", "error": f"exited with 0 but {why}" if why else
                       "exited without writing result.json"}
        elif code < 0:  # the signal alone: its cause (memory, a crash in a library, a user) is not known here
            outcome = {"status": "failed", "error": f"killed by signal {_signal_name(-code)}"}
        else:
            outcome = {"status": "failed", "error": _error_line(directory / "log.txt", offset)}
        return self._done(cell, outcome, seconds, code)

    def _run_in_process(self, cell: Cell) -> dict:
        """Runs the cell by calling the library in this process (no isolation; for tests and debugging)."""
        directory, _, log_path, _, _ = self._prepare(cell)
        from gptlab import finetune, train  # imported on demand: the sweep's own process stays light

        function = train.train_and_evaluate if cell.experiment == "pretrain" else finetune.finetune_and_evaluate
        started = time.perf_counter()
        lock = lock_lib.FileLock(directory / ".lock")
        with open(log_path, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out):
            try:
                config = build_config(cell, init_from=str(run_dir(self.workdir, cell.depends_on))
                                      if cell.depends_on else None)
                function(config, directory)
                outcome = {"status": "finished", "error": None}
            except Preempted as e:
                self.stopping = True
                outcome = {"status": "interrupted", "error": str(e)}
            except UserError as e:
                outcome = {"status": "failed", "error": str(e)}
            except Exception as e:  # pylint: disable=broad-except
                traceback.print_exc(file=out)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                outcome = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
            finally:
                lock.release()
        why = finished_result(self.workdir, cell)[1] if outcome["status"] == "finished" else None
        if outcome["status"] == "finished" and (why or not (directory / results.FILENAME).exists()):
            outcome = {"status": "failed", "error": f"finished but {why}" if why else
                       "finished without writing result.json"}
        return self._done(cell, outcome, time.perf_counter() - started, 0)

    def _done(self, cell: Cell, outcome: dict, seconds: float, code: int) -> dict:
        state = cell_state(self.workdir, cell)
        record = {"status": outcome["status"], "error": outcome["error"], "attempts": state["attempts"],
                  "seconds": state["seconds"] + seconds, "last_attempt_seconds": seconds, "returncode": code}
        self._record(cell, record)
        if outcome["status"] == "finished":
            self.finished_now += 1
            self.seconds_now += seconds
        collect(self.workdir, self.sweep)
        self._progress(cell, record, seconds)
        return record

    def _record(self, cell: Cell, record: dict) -> None:
        directory = run_dir(self.workdir, cell.name)
        directory.mkdir(parents=True, exist_ok=True)
        old = read_json(directory / "sweep_status.json") or {}
        write_json(directory / "sweep_status.json", {**old, **record})
        self.outcomes[cell.name] = record["status"]

    def _position(self) -> str:
        done = self.done_before + sum(1 for s in self.outcomes.values()
                                      if s in ("finished", "failed", "blocked", "skipped"))
        return f"{done}/{self.total}"

    def _progress(self, cell: Cell, record: dict, seconds: float = 0.0) -> None:
        status = record["status"]
        text = f"[{self._position()}] {status} {cell.name}"
        if status == "finished":
            result = results.read_result(run_dir(self.workdir, cell.name)) or {}
            value = result.get(self.sweep.metric)
            text += f" in {seconds:.1f}s" + (f", {self.sweep.metric} {value:.4f}" if isinstance(value, float) else "")
        elif record.get("error"):
            text += f": {record['error']}"
        counts = count_statuses({n: {"status": s} for n, s in self.outcomes.items()})
        failed = counts.get("failed", 0) + counts.get("blocked", 0)
        left = self.total - self.done_before - sum(counts.get(s, 0) for s in ("finished", "failed", "blocked", "skipped"))
        if self.finished_now and left > 0:
            eta = self.seconds_now / self.finished_now * left / self.parallel
            text += f" | {left} left, about {eta / 60:.0f} min"
        if failed:
            text += f" | {failed} failed or blocked so far"
        self.log(text)


def _error_line(log_path: pathlib.Path, offset: int) -> str:
    """The informative last line of this attempt's output: the `error: ...` line, else the traceback's last."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1][:500] if lines else "no output"


# -- cells as cluster jobs (submitit) --------------------------------------------------------------
