"""TFDS builders for the fine-tuning tasks, built offline from the standard library.

`python_stdlib_functions` (task `sft`): one example per documented function or
method: `prompt` is its signature and the summary line of its docstring,
`response` its body, both dedented to the `def`. Going from "continue this file"
to "given a signature and a one-line spec, write the body" is this corpus's
analogue of the step from a base model to an assistant. Files split 90/5/5 by a
hash of their path, exactly as in `python_stdlib`, so validation functions come
from files that pretraining never trained on either.

`python_stdlib_packages` (task `classify`): paragraphs of code (runs of non-blank
lines, at most `SNIPPET_CHARS` characters) labelled with the top-level package
of their file, for the packages in the builder config. Snippets, not files,
are split by a hash of `path:line`: several packages have only a handful of
files, so a split by file would leave whole classes out of validation.

Both are prepared as `array_record` and read through `tfds.data_source`.
"""
import ast
import dataclasses
import hashlib
import json

import tensorflow_datasets as tfds

from gptlab.data import corpora

# The default classes: packages present in every CPython 3.10-3.13, of comparable size.
DEFAULT_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
SNIPPET_CHARS = 256  # a snippet is cut at a line end before it grows longer than this
MIN_SNIPPET_CHARS = 64  # shorter paragraphs (a lone import, a decorator) say too little to classify


def documented_functions(source: str):
    """(line, prompt, response) for every function or method with a docstring and a body after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        docstring = ast.get_docstring(node)
        if not docstring or not docstring.strip():
            continue
        indent = node.col_offset
        dedent = lambda chunk: "".join(line[indent:] if not line[:indent].strip() else line for line in chunk)
        body_indent = " " * max(node.body[0].col_offset - indent, 1)
        summary = docstring.strip().splitlines()[0].strip().replace('"""', "'''")
        prompt = dedent(lines[node.lineno - 1:node.body[0].lineno - 1]) + f'{body_indent}"""{summary}"""\n'
        response = dedent(lines[node.body[0].end_lineno:node.end_lineno])
        if response.strip():
            yield node.lineno, prompt, response


class PythonStdlibFunctions(corpora.PythonStdlib):
    """Documented functions of the Python standard library: prompt (signature and docstring summary), response (body)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__ + "\n" + (self.builder_config.description or ""),
            metadata=tfds.core.MetadataDict(),  # corpora.FileCorpus records its decoding counts there
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "prompt": tfds.features.Text(), "response": tfds.features.Text()}),
        )

    def _generate_examples(self, files):
        for rel, path in files:
            source = path.read_bytes().decode("utf-8", errors="replace")
            for line, prompt, response in documented_functions(source):
                yield f"{rel}:{line}", {"path": rel, "prompt": prompt, "response": response}


def snippets(text: str):
    """(first line, snippet): runs of non-blank lines, cut at line ends to at most SNIPPET_CHARS."""
    current, start = [], 0
    for number, line in enumerate(text.splitlines(keepends=True) + ["\n"], start=1):
        too_long = current and sum(map(len, current)) + len(line) > SNIPPET_CHARS
        if not line.strip() or too_long:
            chunk = "".join(current)
            if len(chunk) >= MIN_SNIPPET_CHARS:
                yield start, chunk[:SNIPPET_CHARS]
            current = []
        if line.strip():
            if not current:
                start = number
            current.append(line)


def split_of_snippet(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    if bucket < corpora.VALIDATION_FRACTION:
        return "validation"
    if bucket < corpora.VALIDATION_FRACTION + corpora.TEST_FRACTION:
        return "test"
    return "train"


@dataclasses.dataclass
class PackagesConfig(corpora.PythonStdlibConfig):
    packages: tuple = ()  # the classes: top-level packages of the standard library


def packages_config(packages=DEFAULT_PACKAGES, include=(), exclude=()) -> PackagesConfig:
    base = corpora.stdlib_config(include, exclude)
    suffix = hashlib.sha256(json.dumps([list(packages), list(include), list(exclude)]).encode()).hexdigest()[:10]
    return PackagesConfig(
        name=f"py{base.python_version}-{suffix}", python_version=base.python_version,
        description=f"{base.description}; classes (packages) {list(packages)}",
        include=tuple(include), exclude=tuple(exclude), packages=tuple(packages))


class PythonStdlibPackages(corpora.PythonStdlib):
    """Snippets of the Python standard library labelled with the top-level package they come from."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [packages_config()]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__ + "\n" + (self.builder_config.description or ""),
            metadata=tfds.core.MetadataDict(),  # corpora.FileCorpus records its decoding counts there
            features=tfds.features.FeaturesDict({
                "path": tfds.features.Text(), "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(self.builder_config.packages))}),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root, cfg = self._root(), self.builder_config
        by_split = {"train": [], "validation": [], "test": []}
        for path in self._candidate_files(root):
            rel = path.relative_to(root).as_posix()
            package = rel.split("/")[0]
            if package not in cfg.packages or not corpora.selected(rel, tuple(cfg.include), tuple(cfg.exclude)):
                continue
            text = path.read_bytes().decode("utf-8", errors="replace")
            for line, snippet in snippets(text):
                key = f"{rel}:{line}"
                by_split[split_of_snippet(key)].append((key, {"path": rel, "text": snippet, "label": package}))
        missing = [p for p in cfg.packages if not any(ex["label"] == p for part in by_split.values() for _, ex in part)]
        if missing:
            raise ValueError(f"no snippets for packages {missing} in this Python's standard library")
        return {name: iter(examples) for name, examples in by_split.items() if examples}
