"""TFDS builders for the fine-tuning tasks, built offline from the standard library.

`python_stdlib_functions` (task `sft`): one example per documented function or
method: `prompt` is its signature and the summary line of its docstring,
`response` its body, both dedented to the `def`. Going from "continue this file"
to "given a signature and a one-line spec, write the body" is this corpus's
analogue of the step from a base model to an assistant.

`python_stdlib_packages` (task `classify`): paragraphs of code (runs of non-blank
lines, at most `SNIPPET_CHARS` characters) labelled with the top-level package
of their file, for the packages in the builder config.

`python_stdlib_blocks` (task `lm` on held-out code): the top-level blocks of each
file (a class, a function, a run of module-level code) as documents.

All three draw from the held-out packages (gptlab/data/held_out.py) through the
fine-tuning presets' data.include, and split by a hash of the top-level block an
example lies in (`path:first line of the block`), 80/10/10: finer than files (a
package such as `logging` has 3), and without leaks, since a block, with every
function nested in it, lies wholly in one split. All are prepared as
`array_record` and read through `tfds.data_source`.
"""
import ast
import bisect
import dataclasses
import hashlib
import json

import tensorflow_datasets as tfds

from gptlab.data import corpora, held_out

# The default classes: the held-out packages, present in every CPython 3.10-3.13.
DEFAULT_PACKAGES = held_out.PACKAGES
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


def top_level_blocks(source: str) -> list:
    """First lines (1-based) of a module's top-level blocks, in order; the first block starts at line 1.

    A block is a top-level class or function (decorators included) or a run of other
    top-level statements; it reaches up to the next block's first line, so the blocks
    tile the file. A file that does not parse is one block.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [1]
    starts, previous_was_def = [1], True
    for node in tree.body:
        is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if (is_def or previous_was_def) and first > starts[-1]:
            starts.append(first)
        previous_was_def = is_def
    return starts


def block_of(starts: list, line: int) -> int:
    """The first line of the block (of `top_level_blocks`) holding `line`."""
    return starts[max(bisect.bisect_right(starts, line) - 1, 0)]


def split_of_block(relative_path: str, block_start: int) -> str:
    """train, validation or test for a top-level block, from a hash of `path:first line`."""
    return held_out.split_of(f"{relative_path}:{block_start}")


class _BlockSplit(corpora.PythonStdlib, skip_registration=True):
    """Selected files -> examples (`_examples(rel, source, starts)` yields (line, key, example)), split by block."""

    def _examples(self, rel: str, source: str, starts: list):
        raise NotImplementedError

    def _accept(self, rel: str) -> bool:
        cfg = self.builder_config
        return corpora.selected(rel, tuple(cfg.include), tuple(cfg.exclude))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = self._root()
        by_split = {"train": [], "validation": [], "test": []}
        for path in self._candidate_files(root):
            rel = path.relative_to(root).as_posix()
            if not self._accept(rel):
                continue
            source = path.read_bytes().decode("utf-8", errors="replace")
            starts = top_level_blocks(source)
            for line, key, example in self._examples(rel, source, starts):
                by_split[split_of_block(rel, block_of(starts, line))].append((key, example))
        self._check(by_split)
        # TFDS cannot write an empty split; a missing split is reported when it is asked for.
        return {name: iter(examples) for name, examples in by_split.items() if examples}

    def _check(self, by_split) -> None:
        del by_split


class PythonStdlibBlocks(_BlockSplit):
    """Top-level blocks of the Python standard library's files, one document each (task lm on held-out code)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _examples(self, rel, source, starts):
        lines = source.splitlines(keepends=True)
        for start, end in zip(starts, starts[1:] + [len(lines) + 1]):
            text = "".join(lines[start - 1:end - 1])
            if text.strip():
                yield start, f"{rel}:{start}", {"path": rel, "text": text}


class PythonStdlibFunctions(_BlockSplit):
    """Documented functions of the Python standard library: prompt (signature and docstring summary), response (body)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "2.0.0": "Split by top-level block, 80/10/10."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__ + "\n" + (self.builder_config.description or ""),
            metadata=tfds.core.MetadataDict(),  # corpora.FileCorpus records its decoding counts there
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "prompt": tfds.features.Text(), "response": tfds.features.Text()}),
        )

    def _examples(self, rel, source, starts):
        del starts
        for line, prompt, response in documented_functions(source):
            yield line, f"{rel}:{line}", {"path": rel, "prompt": prompt, "response": response}


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


class PythonStdlibPackages(_BlockSplit):
    """Snippets of the Python standard library labelled with the top-level package they come from."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "2.0.0": "Split by top-level block, 80/10/10; snippets end at blocks."}
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

    def _accept(self, rel):
        return rel.split("/")[0] in self.builder_config.packages and super()._accept(rel)

    def _examples(self, rel, source, starts):
        lines = source.splitlines(keepends=True)
        for start, end in zip(starts, starts[1:] + [len(lines) + 1]):  # a snippet never crosses a block
            for line, snippet in snippets("".join(lines[start - 1:end - 1])):
                line += start - 1
                yield line, f"{rel}:{line}", {"path": rel, "text": snippet, "label": rel.split("/")[0]}

    def _check(self, by_split):
        packages = self.builder_config.packages
        missing = [p for p in packages if not any(ex["label"] == p for part in by_split.values() for _, ex in part)]
        if missing:
            raise ValueError(f"no snippets for packages {missing} in this Python's standard library")
