"""What every entry point shares: one-line errors for bad input, tracebacks only with --verbose.

Importing it also makes SIGTERM/SIGINT stop the command cleanly at any moment outside the
training loop (which installs its own checkpointing handler, `loop.PreemptionGuard`):
one line, exit 75, and nothing lost, since before the loop nothing has been trained and
after it the last step is already being checkpointed (cleanup still runs on the way out).
"""
import difflib
import errno
import os
import pathlib
import re
import signal
import sys
import threading

from absl import app, flags, logging

from gptlab.errors import Preempted, UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
# The entry points, configs and projects are run from the repository, not installed; an entry point started
# from another directory (`python -m` finds experiments/ through the editable install's path) still imports them.
if (REPO / "configs").is_dir() and str(REPO) not in sys.path:
    sys.path.append(str(REPO))


_running = False  # set once the command's main function runs (before: still importing)


class _Stopped(SystemExit):
    """A signal outside the training loop: unwinds through cleanup (checkpoint waits, lock release)."""

    def __init__(self, signum: int):
        super().__init__(Preempted.EXIT_CODE)
        self.signum = signum


_announced = False  # the stop is said once, however often the signal has to be handled


def _stop_cleanly(signum, frame):
    global _announced
    del frame
    if not _announced:
        _announced = True
        print(f"stopped by {signal.Signals(signum).name} outside the training loop: every trained step is "
              "checkpointed (or none was taken yet); run the same command again to continue",
              file=sys.stderr, flush=True)
    if not _running:  # still importing: nothing written yet, and unwinding a half-imported extension can crash
        os._exit(Preempted.EXIT_CODE)
    raise _Stopped(signum)


_print_unraisable = sys.unraisablehook


def _stop_again_later(unraisable) -> None:
    """A stop raised inside a callback Python cannot unwind (a gc callback such as JAX's, a __del__, a weakref
    callback) is printed as 'Exception ignored' and dropped, and the command would run on. Deliver the
    signal again a moment later, from another thread, so the handler runs once the callback has returned
    (should it land in one again, this repeats)."""
    if isinstance(unraisable.exc_value, _Stopped):
        again = threading.Timer(0.05, os.kill, args=(os.getpid(), unraisable.exc_value.signum))
        again.daemon = True
        again.start()
        return
    _print_unraisable(unraisable)


if threading.current_thread() is threading.main_thread():
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, _stop_cleanly)
    sys.unraisablehook = _stop_again_later

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors caused by bad input.")


def define_checkpoint_flags(what: str) -> tuple:
    """--workdir (required) and --step, spelled alike by every command that loads a trained model."""
    return (flags.DEFINE_string("workdir", None, f"The workdir whose checkpoint to {what}.", required=True),
            flags.DEFINE_string("step", None, "Checkpoint step to load, or 'best' (by validation); default the latest."))


def define_sampling_flags(max_new_tokens: int, temperature: float, top_k: int, top_p: float = 1.0) -> tuple:
    """--max_new_tokens, --temperature, --top_k, --top_p and --seed, with a command's own defaults."""
    return (flags.DEFINE_integer("max_new_tokens", max_new_tokens, "Most tokens to generate per reply or sample."),
            flags.DEFINE_float("temperature", temperature, "Softmax temperature; 0 is greedy decoding."),
            flags.DEFINE_integer("top_k", top_k, "Sample from the k most likely tokens only; 0 disables."),
            flags.DEFINE_float("top_p", top_p, "Sample from the most likely tokens holding this probability; 1 disables."),
            flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text."))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The informative line of an error message (the last line of an embedded traceback)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]
    text = " ".join(lines)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text or type(error).__name__


def default_config(path: str) -> str:
    """An entry point's default --config, found in the repository when the command runs from elsewhere."""
    file = path.split(":")[0]
    return path if os.path.exists(file) or not (REPO / file).is_file() else str(REPO / path)


def _repository_config(arg: str) -> str:
    match = re.fullmatch(r"--config=([^:]+\.py)(:.*)?", arg)
    if match and not os.path.exists(match.group(1)) and not os.path.isabs(match.group(1)) \
            and (REPO / match.group(1)).is_file():
        return f"--config={REPO / match.group(1)}{match.group(2) or ''}"
    return arg


# ml_collections loads --config while the entry point defines its flags, before absl parses anything.
sys.argv[1:] = [_repository_config(arg) for arg in sys.argv[1:]]


def _config_files(argv):
    """--config=PATH[:preset] arguments: a relative PATH not found here is looked up in the repository
    (so commands work from any directory); one found nowhere is refused in one line with a suggestion."""
    asks_help = any(a in HELP_FLAGS for a in argv[1:])
    if "config" in flags.FLAGS and not asks_help and not any(a.startswith("--config=") for a in argv):
        # The entry point's default config file (None where --config is required: absl says it is missing).
        default = (flags.FLAGS["config"].default_as_str or "").strip("'\"")
        if default and not os.path.exists(default.split(":")[0]):  # loaded when defined: too late to redirect
            fail(f"the default --config file {default.split(':')[0]} is not in {os.getcwd()}: run from the "
                 f"repository root {REPO}, or pass --config={REPO / default}")
    argv = [_repository_config(arg) for arg in argv]
    for arg in argv:
        match = re.fullmatch(r"--config=([^:]+\.py)(:.*)?", arg)
        if match and not os.path.exists(match.group(1)):
            path, preset = match.group(1), match.group(2) or ""
            known = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py") if p.name != "__init__.py")
            close = difflib.get_close_matches(path, known, n=1)
            fail(f"--config file {path} does not exist (looked in {os.getcwd()} and in {REPO}): "
                 + (f"did you mean --config={close[0]}{preset}?" if close else f"the configs are {known}"))
    return argv


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv):
    """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
    verbose = "--verbose" in argv
    argv = _config_files(argv)
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl exits with 1 after printing the help that was asked for: that is success
        if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except Exception as e:  # pylint: disable=broad-except
        if verbose:
            raise
        cause = e.__cause__ or e.__context__
        if isinstance(e, flags.Error):
            fail(_one_line(e) if str(e).strip() else _one_line(cause) if cause else "bad command-line flags")
        if isinstance(e, OSError):  # ml_collections: the config file cannot be loaded
            fail(f"cannot load the --config file: {_one_line(e).replace('Failed loading config file config_config ', '')}")
        # ml_collections raises AttributeError/KeyError/TypeError/ValueError for unknown fields and bad types.
        fail(f"bad --config override: {_one_line(e)}; the fields are listed, with comments, in the config file")


def run(main) -> None:
    """Runs `main()` under absl: a UserError becomes `error: ...` on stderr and exit status 2."""

    def absl_main(argv):
        if not _VERBOSE.value:
            # Orbax and TFDS log every file operation, and Orbax's writer threads log each failure with a
            # traceback before the main thread reports it in one line; --verbose shows them all.
            logging.set_verbosity(logging.FATAL)
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
        if len(argv) > 1:
            fail(f"unexpected positional arguments {argv[1:]}: flags look like --name=value")
        global _running
        _running = True
        try:
            main()
        except _Stopped:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(Preempted.EXIT_CODE)  # cleanup is done; skip finalizing TF/XLA threads mid-flight
        except UserError as e:
            if _VERBOSE.value:
                raise
            fail(str(e))
        except Preempted as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(Preempted.EXIT_CODE)
        except OSError as e:  # a full disk or quota: a resource the user can free, not a bug
            if _VERBOSE.value or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            fail(f"could not write {e.filename or 'a file'} ({e.strerror}): every file is written whole or not at "
                 "all; free disk space and rerun the same command")

    app.run(absl_main, flags_parser=_parse_flags)
