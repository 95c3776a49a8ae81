"""TFDS builders for corpora that are always there: no download, no TensorFlow.

`python_stdlib`: the running interpreter's standard-library `.py` files, one
example per file (`path`, `text`). `text_folder`: a user's own folder of text
files. Both split deterministically by a hash of each file's relative path
(90/5/5 train/validation/test), so a file lands in the same split whatever the
include/exclude patterns; the patterns (fnmatch globs on `/`-joined relative
paths, where `*` also matches `/`) let a narrow domain such as one package be
held out of pretraining and used for fine-tuning. They are part of the builder
config, so each filtered corpus is prepared, versioned and cached on its own.

Both are prepared as `array_record` and read through `tfds.data_source`.
"""
import dataclasses
import fnmatch
import hashlib
import json
import pathlib
import sys
import sysconfig

import tensorflow_datasets as tfds

# Fractions of files (by path hash) in each split; the rest is train.
VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.05


def split_of(relative_path: str) -> str:
    """Deterministic split of a file from a hash of its relative path."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    if bucket < VALIDATION_FRACTION:
        return "validation"
    if bucket < VALIDATION_FRACTION + TEST_FRACTION:
        return "test"
    return "train"


def selected(relative_path: str, include: tuple, exclude: tuple) -> bool:
    if include and not any(fnmatch.fnmatchcase(relative_path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(relative_path, p) for p in exclude)


def _pattern_suffix(*parts) -> str:
    if not any(parts):
        return ""
    return "-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


@dataclasses.dataclass
class FileCorpusConfig(tfds.core.BuilderConfig):
    include: tuple = ()  # keep only files matching one of these globs (empty: all)
    exclude: tuple = ()  # then drop files matching any of these globs


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
        # TFDS cannot write an empty split; a missing split is reported when it is asked for.
        return {name: self._generate_examples(files) for name, files in by_split.items() if files}

    def _generate_examples(self, files):
        for rel, path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            yield rel, {"path": rel, "text": text}


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclasses.dataclass
class PythonStdlibConfig(FileCorpusConfig):
    python_version: str = ""  # the corpus differs between Python versions


def stdlib_config(include=(), exclude=()) -> PythonStdlibConfig:
    """The builder config for this interpreter's standard library, optionally filtered."""
    version = python_version()
    return PythonStdlibConfig(
        name=f"py{version}{_pattern_suffix(list(include), list(exclude))}",
        description=f"Python {version} standard library; include={list(include)} exclude={list(exclude)}",
        python_version=version, include=tuple(include), exclude=tuple(exclude))


class PythonStdlib(_FileCorpus):
    """The Python standard library's `.py` files (site-packages excluded)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
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


@dataclasses.dataclass
class TextFolderConfig(FileCorpusConfig):
    root: str = ""  # the folder to read
    glob: str = "**/*"  # which files under it (pathlib glob)


def text_folder_config(root, glob="**/*", include=(), exclude=()) -> TextFolderConfig:
    root = str(pathlib.Path(root).expanduser().resolve())
    return TextFolderConfig(
        name="folder" + _pattern_suffix(root, glob, list(include), list(exclude)),
        description=f"text files {glob!r} under {root}; include={list(include)} exclude={list(exclude)}",
        root=root, glob=glob, include=tuple(include), exclude=tuple(exclude))


class TextFolder(_FileCorpus):
    """A user's own folder of UTF-8 text files, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _root(self):
        return pathlib.Path(self.builder_config.root)

    def _candidate_files(self, root):
        return sorted(p for p in root.glob(self.builder_config.glob) if p.is_file())
