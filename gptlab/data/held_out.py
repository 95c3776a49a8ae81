"""The held-out part of the standard library: the one definition every preset and task uses.

Pretraining reads the standard library minus these packages (and minus `test/`);
every fine-tuning task (lm on held-out code, sft, classify) draws its train,
validation and test examples from these packages only. So a fine-tuned number
measures adaptation to code the pretrained model never read, not recall of it.
tests/test_held_out.py checks the disjointness by file path for every pretraining
preset and every task, and fails for a task or preset that breaks it.

Pure Python (no TFDS import): configs import it.

Splits of the held-out data: several packages have only a handful of files
(`http` 5, `logging` 3), so splitting by file would leave validation and test with
one or two files each. The task corpora split at a finer grain, the top-level
statement of a module (a class, a function, a run of module-level code): every
example lies inside one such block, and a block lies wholly in one split, so no
text of a validation or test example (a nested function's body, say) is ever in
a training example. Fractions below; the rest is train.
"""
import fnmatch
import hashlib

# The classes of the classify task, and everything fine-tuning may draw from.
# About 20% of the non-test standard library by bytes (Python 3.11: 2.95 of 14.4 MB).
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
# The narrow corpus of the lm task and the data-efficiency study: one held-out package.
NARROW_PACKAGE = "email"
# The standard library's own test suites are not narrow-domain code; tasks leave them out.
STDLIB_TESTS = ("test/*", "*/test/*", "*/tests/*", "*/idle_test/*")

VALIDATION_FRACTION = 0.10  # of the held-out blocks; large enough that seed noise stays below the effects
TEST_FRACTION = 0.10


def globs(packages=PACKAGES) -> tuple:
    """data.include / data.exclude globs matching every file of `packages`."""
    return tuple(f"{p}/*" for p in packages)


PRETRAIN_EXCLUDE = ("test/*",) + globs()  # what every stdlib pretraining preset leaves out


def is_held_out(relative_path: str) -> bool:
    return any(fnmatch.fnmatchcase(relative_path, g) for g in globs())


def split_of(key: str, validation_fraction: float = VALIDATION_FRACTION, test_fraction: float = TEST_FRACTION) -> str:
    """train, validation or test for `key` (a file's path, a block's `path:first line`, a JSONL line's text) from
    its hash: the same key lands in the same split on every machine and in every run, in these fractions."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    if bucket < validation_fraction:
        return "validation"
    if bucket < validation_fraction + test_fraction:
        return "test"
    return "train"
