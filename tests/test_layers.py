"""The library's layering, read from its source (ast, no import): gptlab/ imports nothing from the folders
above it, its modules import each other without cycles, and none is over 600 lines.

Imports inside functions count as much as those at the top of a module: a cycle or an upward import
hidden in a function is still one.
"""
import ast
import pathlib

from conftest import REPO

ABOVE = {"configs", "experiments", "projects", "dev", "tools"}  # the folders that use the library
MAX_LINES = 600


def modules(root: pathlib.Path, package: str = "gptlab") -> dict:
    """{module name: its file} for every .py file under root/package (a package's name for its __init__.py)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: pathlib.Path, name: str, known) -> list:
    """[(imported module, line)] of every import statement in the file, at any depth; `from X import Y` names
    the module X.Y where that is a module of `known`, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per further dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, node.lineno))
    return found


def upward_imports(root: pathlib.Path) -> list:
    """["gptlab/x.py:LINE imports configs.y"] for every import of a folder above the library."""
    found = modules(root)
    return [f"{path.relative_to(root)}:{line} imports {target}" for name, path in found.items()
            for target, line in imports(path, name, found) if target.split(".")[0] in ABOVE]


def import_cycles(root: pathlib.Path) -> list:
    """Each cycle among the library's modules once, as [a, b, ..., a]."""
    found = modules(root)
    graph = {name: sorted({t for t, _ in imports(path, name, found) if t in found and t != name})
             for name, path in found.items()}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name, path):
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    return cycles


def long_modules(root: pathlib.Path) -> list:
    """["gptlab/x.py: N lines"] for every module over MAX_LINES."""
    return [f"{path.relative_to(root)}: {n} lines" for path in modules(root).values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]


def test_the_library_imports_nothing_from_the_folders_above_it():
    assert upward_imports(REPO) == []


def test_the_library_modules_import_each_other_without_cycles():
    assert import_cycles(REPO) == []


def test_no_library_module_is_over_600_lines():
    assert long_modules(REPO) == []


def test_the_checks_find_a_planted_upward_import_cycle_and_long_module(tmp_path):
    lib = tmp_path / "gptlab"
    (lib / "sub").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "a.py").write_text("from gptlab import b\n")
    (lib / "b.py").write_text("def f():\n    from gptlab.sub import c  # inside a function: still an import\n")
    (lib / "sub" / "__init__.py").write_text("")
    (lib / "sub" / "c.py").write_text("from .. import a\nimport configs.pretrain\n")
    (lib / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (lib / "fine.py").write_text("from gptlab.sub import c\nfrom experiments import pretrain  # noqa\n")
    assert upward_imports(tmp_path) == ["gptlab/fine.py:2 imports experiments",
                                        "gptlab/sub/c.py:2 imports configs.pretrain"]
    assert import_cycles(tmp_path) == [["gptlab.a", "gptlab.b", "gptlab.sub.c", "gptlab.a"]]
    assert long_modules(tmp_path) == [f"gptlab/long.py: {MAX_LINES + 1} lines"]
