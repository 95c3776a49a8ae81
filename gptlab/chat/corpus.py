"""The embedded chat data: conversations and preference pairs about the held-out standard library.

Built offline, in memory, from the documented functions of the held-out packages
(gptlab/data/held_out.py: never read by pretraining; tests/test_protocol.py's
disjointness applies), with `task_corpora.documented_functions` (prompt = the
signature and the docstring's summary line, response = the body). Each function
gives three conversations:

- write: "Write the body of this function:" + signature and summary -> the body;
  a follow-up "Which module is it in?" -> the module.
- explain: "What does this function do?" + the code without its docstring -> the
  summary line; a follow-up "What is it called?" -> its qualified name.
- which-module: "Which module defines `Name.method`?" -> the module; a follow-up
  "What does it do?" -> the summary line (only for names defined once in the
  held-out packages, so the answer is unique).

One conversation in four (by hash) opens with a system turn, so the template's
system role is exercised. Splits are those of the other held-out tasks: a hash of
the top-level block the function lies in (`task_corpora.split_of_block`), 80/10/10,
so a function and everything nested in it lie in one split. A few questions are
word for word the same for functions in different blocks (`emit(self, record)`,
"Emit a record."); such a question is dropped from validation and test when
training asks it, so no evaluation question is one the model trained on.

Preference pairs, one per (function, kind), prompt = the first user turn,
chosen = the real answer, rejected = a plausible wrong one from the same split:
- write: the body of the next function (file order) with a different body, or,
  for one function in two with a body of at least two lines (by hash), its body
  cut to its first half of lines (a truncated answer);
- explain: the summary line of the next function with a different summary (a
  neighbour's docstring);
- which-module: the next function's module, if different, else the next
  held-out module in alphabetical order.
"""
import ast
import functools
import hashlib
import pathlib
import sysconfig

from gptlab.data import corpora, held_out, task_corpora

SYSTEM_PROMPT = "You are a helpful assistant who knows the Python standard library."


def _stable(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)


def _qualnames(tree) -> dict:
    """{line of a def: qualified name (Class.method)} for every function in the module."""
    names = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    names[child.lineno] = name
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return names


def module_name(relative_path: str) -> str:
    parts = relative_path[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=4)
def functions(include: tuple = held_out.globs(), exclude: tuple = held_out.STDLIB_TESTS, root: str = None) -> tuple:
    """Every documented function of the held-out files that `include`/`exclude` (globs) select: dicts with
    path, module, name, summary, prompt (signature and summary), code (without docstring), body and split;
    in file order. Files outside the held-out packages are never read, whatever the globs say."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not held_out.is_held_out(rel) or not corpora.selected(rel, tuple(include), tuple(exclude)):
            continue
        source = path.read_bytes().decode("utf-8", errors="replace")
        try:
            names = _qualnames(ast.parse(source))
        except (SyntaxError, ValueError):
            continue
        starts = task_corpora.top_level_blocks(source)
        for line, prompt, body in task_corpora.documented_functions(source):
            signature, docstring_line = prompt.rstrip("\n").rsplit("\n", 1)
            summary = docstring_line.strip()[3:-3].strip()
            if not summary or line not in names:
                continue
            out.append(dict(path=rel, module=module_name(rel), name=names[line], summary=summary, prompt=prompt,
                            code=signature + "\n" + body, body=body,
                            split=task_corpora.split_of_block(rel, task_corpora.block_of(starts, line))))
    return tuple(out)


def _turns(*pairs) -> list:
    messages = []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _questions(f: dict, unique: bool) -> dict:
    """{kind: (first user turn, answer, follow-up pairs)} for one function."""
    kinds = {
        "write": ("Write the body of this function:\n" + f["prompt"], f["body"],
                  [("Which module is it in?", f"`{f['module']}`")]),
        "explain": ("What does this function do?\n" + f["code"], f["summary"],
                    [("What is it called?", f"`{f['name']}`")]),
    }
    if unique:
        kinds["which_module"] = (f"Which module defines `{f['name']}`?", f"`{f['module']}`",
                                 [("What does it do?", f["summary"])])
    return kinds


@functools.lru_cache(maxsize=4)
def _train_questions(include: tuple, exclude: tuple) -> frozenset:
    fns = functions(include, exclude)
    counts = _name_counts(fns)
    return frozenset(q for f in fns if f["split"] == "train" for q, _, _ in _questions(f, counts[f["name"]] == 1).values())


def _name_counts(fns) -> dict:
    counts = {}
    for f in fns:
        counts[f["name"]] = counts.get(f["name"], 0) + 1
    return counts


def _asked(split: str, include: tuple, exclude: tuple):
    """(function, kind, question, answer, follow-ups) of `split`, without evaluation questions training asks."""
    fns = functions(include, exclude)
    counts = _name_counts(fns)
    seen = _train_questions(include, exclude) if split != "train" else frozenset()
    for f in fns:
        if f["split"] == split:
            for kind, (question, answer, follow_ups) in _questions(f, counts[f["name"]] == 1).items():
                if question not in seen:
                    yield f, kind, question, answer, follow_ups


def conversations(split: str, include: tuple = held_out.globs(), exclude: tuple = held_out.STDLIB_TESTS) -> list:
    """The chat SFT conversations of `split`: [{"messages": [...], "kind": ...}]."""
    out = []
    for f, kind, question, answer, follow_ups in _asked(split, tuple(include), tuple(exclude)):
        messages = _turns((question, answer), *follow_ups)
        if _stable(f"system:{f['path']}:{f['name']}:{kind}") % 4 == 0:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] + messages
        out.append({"messages": messages, "kind": kind})
    return out


def preferences(split: str, include: tuple = held_out.globs(), exclude: tuple = held_out.STDLIB_TESTS) -> list:
    """The preference pairs of `split`: [{"prompt": messages, "chosen", "rejected", "kind"}]."""
    include, exclude = tuple(include), tuple(exclude)
    every = functions(include, exclude)
    fns = [f for f in every if f["split"] == split]
    position = {id(f): i for i, f in enumerate(fns)}
    modules = sorted({f["module"] for f in every})
    out = []
    for f, kind, question, answer, _ in _asked(split, include, exclude):
        i = position[id(f)]

        def neighbour(field):  # the next function (file order, wrapping) whose `field` differs
            return next((fns[(i + j) % len(fns)][field] for j in range(1, len(fns))
                         if fns[(i + j) % len(fns)][field].strip() != f[field].strip()), None)

        if kind == "write":
            lines = f["body"].splitlines(keepends=True)
            if len(lines) >= 2 and _stable(f"truncate:{f['path']}:{f['name']}") % 2 == 0:
                rejected = "".join(lines[:len(lines) // 2])
            else:
                rejected = neighbour("body")
        elif kind == "explain":
            rejected = neighbour("summary")
        else:
            other = neighbour("module")
            rejected = f"`{other or modules[(modules.index(f['module']) + 1) % len(modules)]}`"
        if rejected and rejected.strip() != answer.strip():
            out.append({"prompt": [{"role": "user", "content": question}], "chosen": answer,
                        "rejected": rejected, "kind": kind})
    return out
