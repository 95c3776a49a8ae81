"""TFDS builders for corpora that are always there: no download, no TensorFlow.

`python_stdlib`: the running interpreter's standard-library `.py` files, one
example per file (`path`, `text`). `python_stdlib_docstrings`: English prose from
the same files, their docstrings only (module, class, function), one example per
file: a pretraining corpus of text, not code, for studies of transfer from text
to code (projects/pretrain_vs_finetune/config.py). `text_folder`: a user's own folder of text
files. Both split deterministically by a hash of each file's relative path
(90/5/5 train/validation/test), so a file lands in the same split whatever the
include/exclude patterns; the patterns (fnmatch globs on `/`-joined relative
paths, where `*` also matches `/`) let a narrow domain such as one package be
held out of pretraining and used for fine-tuning. They are part of the builder
config, so each filtered corpus is prepared, versioned and cached on its own.

Both are prepared as `array_record` and read through `tfds.data_source`.

Decoding is explicit (`data.encoding`, `data.decode_errors`, part of the builder
config): bytes that do not decode either stop the preparation with the file and
byte offset (`strict`, the default), or become U+FFFD and are counted (`replace`).
Binary files (a NUL byte in the first 8 KiB, git's test) are skipped and counted.
The counts are stored with the prepared dataset (`decoding_note`).
"""
import ast
import dataclasses
import fnmatch
import hashlib
import json
import pathlib
import sys
import sysconfig

import tensorflow_datasets as tfds

from gptlab.data import held_out
from gptlab.errors import UserError

# Fractions of files (by path hash) in each split; the rest is train.
VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.05


def split_of(relative_path: str) -> str:
    """Deterministic split of a file from a hash of its relative path."""
    return held_out.split_of(relative_path, VALIDATION_FRACTION, TEST_FRACTION)


def selected(relative_path: str, include: tuple, exclude: tuple) -> bool:
    if include and not any(fnmatch.fnmatchcase(relative_path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(relative_path, p) for p in exclude)


DECODE_ERRORS = ("strict", "replace")
_BINARY_PROBE = 8192  # bytes inspected for a NUL


def decode_file(path: pathlib.Path, relative_path: str, encoding: str, errors: str):
    """(text, replaced sequences) of a file, or (None, 0) for a binary file; strict errors raise UserError."""
    raw = path.read_bytes()
    if b"\0" in raw[:_BINARY_PROBE] and not encoding.lower().replace("-", "").startswith(("utf16", "utf32")):
        return None, 0
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise UserError(f"{path} is not valid {encoding}: byte {e.start} (0x{raw[e.start]:02x}) does not decode "
                            f"({e.reason}); set data.encoding to the files' encoding (e.g. latin-1), or "
                            "data.decode_errors=replace to train on it with U+FFFD in place of such bytes, or leave "
                            f"the file out with data.exclude=('{relative_path}',)") from None
    text = raw.decode(encoding, errors="replace")
    return text, text.count("\ufffd") - raw.decode(encoding, errors="ignore").count("\ufffd")


def check_decoding(encoding: str, decode_errors: str) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"data.encoding={encoding!r} is not a known text encoding: e.g. utf-8, latin-1, cp1252") from None
    if decode_errors not in DECODE_ERRORS:
        raise UserError(f"data.decode_errors={decode_errors!r} must be one of {DECODE_ERRORS}: strict refuses a file that "
                        "does not decode, replace puts U+FFFD in place of its bad bytes and counts them")


def decoding_note(builder):
    """What preparing skipped or replaced (a line for the log), or None when every file decoded cleanly."""
    stats = dict(builder.info.metadata or {}).get("decoding") or {}
    parts = []
    if stats.get("binary_files"):
        parts.append(f"{stats['binary_files']} binary file(s) skipped (e.g. {stats['first_binary']})")
    if stats.get("replaced"):
        parts.append(f"{stats['replaced']:,} undecodable byte sequence(s) in {stats['replaced_files']} file(s) "
                     f"replaced with U+FFFD (e.g. {stats['first_replaced']}; data.decode_errors=replace)")
    return f"data: {builder.info.full_name}: " + "; ".join(parts) if parts else None


def _pattern_suffix(*parts) -> str:
    if not any(parts):
        return ""
    return "-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


@dataclasses.dataclass
class FileCorpusConfig(tfds.core.BuilderConfig):
    include: tuple = ()  # keep only files matching one of these globs (empty: all)
    exclude: tuple = ()  # then drop files matching any of these globs
    encoding: str = "utf-8"  # the files' text encoding
    decode_errors: str = "strict"  # strict: refuse bytes that do not decode; replace: U+FFFD, counted


class _FileCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic: list files, filter, split by path hash, one example per file."""

    def _root(self) -> pathlib.Path:
        raise NotImplementedError

    def _candidate_files(self, root: pathlib.Path):
        raise NotImplementedError

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__ + "\n" + (self.builder_config.description or ""),
            features=tfds.features.FeaturesDict({"path": tfds.features.Text(), "text": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = self._root()
        cfg = self.builder_config
        by_split = {"train": [], "validation": [], "test": []}
        for path in self._candidate_files(root):
            rel = path.relative_to(root).as_posix()
            if selected(rel, tuple(cfg.include), tuple(cfg.exclude)):
                by_split[split_of(rel)].append((rel, path))
        self._check_decoding(by_split)
        # TFDS cannot write an empty split; a missing split is reported when it is asked for.
        return {name: self._generate_examples(files) for name, files in by_split.items() if files}

    def _check_decoding(self, by_split: dict) -> None:
        """Decodes every file once before anything is written: refuses (strict), drops binary files and
        records the counts in the dataset's metadata."""
        cfg = self.builder_config
        encoding, errors = getattr(cfg, "encoding", "utf-8"), getattr(cfg, "decode_errors", "strict")
        check_decoding(encoding, errors)
        stats = {"encoding": encoding, "decode_errors": errors, "binary_files": 0, "first_binary": None,
                 "replaced": 0, "replaced_files": 0, "first_replaced": None}
        for name, files in by_split.items():
            kept = []
            for rel, path in files:
                text, replaced = decode_file(path, rel, encoding, errors)
                if text is None:
                    stats["binary_files"] += 1
                    stats["first_binary"] = stats["first_binary"] or rel
                    continue
                if replaced:
                    stats["replaced"] += replaced
                    stats["replaced_files"] += 1
                    stats["first_replaced"] = stats["first_replaced"] or rel
                kept.append((rel, path))
            by_split[name] = kept
        self.info.metadata["decoding"] = stats

    def _generate_examples(self, files):
        cfg = self.builder_config
        for rel, path in files:
            text, _ = decode_file(path, rel, getattr(cfg, "encoding", "utf-8"), getattr(cfg, "decode_errors", "strict"))
            yield rel, {"path": rel, "text": text}


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclasses.dataclass
class PythonStdlibConfig(FileCorpusConfig):
    python_version: str = ""  # the corpus differs between Python versions


def _decoding_parts(encoding: str, decode_errors: str) -> list:
    """Name parts for a non-default decoding (the default keeps the names corpora always had)."""
    return [] if (encoding, decode_errors) == ("utf-8", "strict") else [encoding, decode_errors]


def stdlib_config(include=(), exclude=(), encoding="utf-8", decode_errors="strict") -> PythonStdlibConfig:
    """The builder config for this interpreter's standard library, optionally filtered."""
    version = python_version()
    decoding = _decoding_parts(encoding, decode_errors)
    return PythonStdlibConfig(
        name=f"py{version}{_pattern_suffix(list(include), list(exclude), *decoding)}",
        description=f"Python {version} standard library; include={list(include)} exclude={list(exclude)}",
        python_version=version, include=tuple(include), exclude=tuple(exclude), encoding=encoding,
        decode_errors=decode_errors)


class PythonStdlib(_FileCorpus):
    """The Python standard library's `.py` files (site-packages excluded)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Explicit decoding: refuse or count bad bytes; skip binaries."}
    BUILDER_CONFIGS = [stdlib_config()]

    def _root(self):
        wanted = self.builder_config.python_version
        if wanted != python_version():
            raise ValueError(f"the python_stdlib corpus for Python {wanted} can only be built by "
                             f"Python {wanted}; this is Python {python_version()}")
        return pathlib.Path(sysconfig.get_paths()["stdlib"])

    def _candidate_files(self, root):
        return sorted(p for p in root.rglob("*.py")
                      if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file())


def docstrings(source: str) -> str:
    """A module's docstrings (the module's, then every class's and function's, in source order), cleaned of their
    indentation and separated by blank lines; "" for a file without any or that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # e.g. lib2to3's test data; such a file simply has no prose
        return ""
    nodes = [tree] + sorted((n for n in ast.walk(tree)
                             if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                            key=lambda n: n.lineno)
    return "\n\n".join(text for text in (ast.get_docstring(n, clean=True) for n in nodes) if text)


class PythonStdlibDocstrings(PythonStdlib):
    """English prose: the docstrings of the Python standard library's `.py` files, one example per file.

    The same files, include/exclude globs and path-hash splits as `python_stdlib`; a file without docstrings
    gives no example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _generate_examples(self, files):
        for rel, path in files:
            text = docstrings(path.read_bytes().decode("utf-8", errors="replace"))
            if text:
                yield rel, {"path": rel, "text": text}


@dataclasses.dataclass
class TextFolderConfig(FileCorpusConfig):
    root: str = ""  # the folder to read
    glob: str = "**/*"  # which files under it (pathlib glob)


def text_folder_config(root, glob="**/*", include=(), exclude=(), encoding="utf-8",
                       decode_errors="strict") -> TextFolderConfig:
    root = str(pathlib.Path(root).expanduser().resolve())
    return TextFolderConfig(
        name="folder" + _pattern_suffix(root, glob, list(include), list(exclude),
                                        *_decoding_parts(encoding, decode_errors)),
        description=f"text files {glob!r} under {root}; include={list(include)} exclude={list(exclude)}",
        root=root, glob=glob, include=tuple(include), exclude=tuple(exclude), encoding=encoding,
        decode_errors=decode_errors)


class TextFolder(_FileCorpus):
    """A user's own folder of text files (data.encoding), one example per file."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Explicit decoding: refuse or count bad bytes; skip binaries."}

    def _root(self):
        return pathlib.Path(self.builder_config.root)

    def _candidate_files(self, root):
        return sorted(p for p in root.glob(self.builder_config.glob) if p.is_file())
