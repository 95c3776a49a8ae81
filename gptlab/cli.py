"""What every entry point shares: one-line errors for bad input, tracebacks only with --verbose."""
import sys

from absl import app, flags, logging

from gptlab.errors import Preempted, UserError

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors caused by bad input.")


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


def _parse_flags(argv):
    """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
    verbose = "--verbose" in argv
    try:
        return flags.FLAGS(argv)
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
            # Orbax and TFDS log every file operation; keep the terminal for our own lines.
            logging.set_verbosity(logging.ERROR)
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
        if len(argv) > 1:
            fail(f"unexpected positional arguments {argv[1:]}: flags look like --name=value")
        try:
            main()
        except UserError as e:
            if _VERBOSE.value:
                raise
            fail(str(e))
        except Preempted as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(Preempted.EXIT_CODE)

    app.run(absl_main, flags_parser=_parse_flags)
