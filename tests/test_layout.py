"""The package's shape, checked from the source: three layers with imports pointing only downward
(running -> data -> method), no import cycles, self-standing component files, and sizes a reader can hold in mind.

    denseclip/*.py, denseclip/detection/   the method: imports neither denseclip.data nor denseclip.run
    denseclip/data/                        the data: may import the method, never denseclip.run
    denseclip/run/, train.py eval.py demo.py   running: may import everything below it
    tools/*.py, hubconf.py                   on top, like the scripts

The facade denseclip/__init__.py is the method's one window onto the data (the default class names of build_model).
Every import counts, also one inside a function: a lazy import is still a dependency.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py", "demo.py")
# Files a reader copies alone: standard library and torch only (ftfy / regex for the tokenizer).
COMPONENTS = {"tokenizer.py": {"ftfy", "regex"}, "clip.py": set(), "resnet.py": set(), "prompting.py": set(),
              "fpn.py": set(), "heads.py": set(), "readouts.py": set()}
FACADE_MAY_IMPORT = {"denseclip.data.classes"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
STDLIB = getattr(sys, "stdlib_module_names", None) or {"abc", "argparse", "ast", "collections", "contextlib",
                                                       "copy", "dataclasses", "functools", "gzip", "html", "io",
                                                       "json", "math", "os", "pathlib", "re", "sys", "typing",
                                                       "warnings", "zipfile"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """Absolute names of every module `path` imports (relative imports resolved; `from a import b` gives a.b when
    a.b is a module of ours, else a)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if is_ours(f"{base}.{a.name}"))
    return {m for m in found if m}


def is_ours(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(name: str) -> str:
    if name.startswith(("denseclip.run", "tools.")) or name in {s[:-3] for s in SCRIPTS} | {"hubconf"}:
        return "run"
    return "data" if name.startswith("denseclip.data") else "method"


def violations(path: Path) -> list:
    """What is wrong with the imports of one file of ours, as readable lines (empty: nothing)."""
    me, out = module_name(path), []
    below = {"method": (), "data": ("run",), "run": ()}[layer(me)]
    for name in sorted(imports(path)):
        ours = name.split(".")[0] == "denseclip"
        if layer(me) == "method" and ours and layer(name) != "method" and not (
                me == "denseclip" and name in FACADE_MAY_IMPORT):
            out.append(f"{path.name}: the method imports {name} ({layer(name)} layer)")
        if ours and layer(name) in below:
            out.append(f"{path.name}: the data layer imports {name} (running)")
        if path.parent.name == "denseclip" and path.name in COMPONENTS:
            allowed = STDLIB | {"torch", "__future__"} | COMPONENTS[path.name]
            top = name.split(".")[0]
            if top not in allowed:
                out.append(f"{path.name}: a component file imports {name} (only the standard library and torch)")
    return out


def our_files() -> list:
    return (sorted((ROOT / "denseclip").rglob("*.py")) + [ROOT / s for s in SCRIPTS] + sorted(ROOT.glob("tools/*.py"))
            + [ROOT / "hubconf.py"])


def test_imports_point_only_downward_and_components_stand_alone():
    problems = [v for p in our_files() for v in violations(p)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_method_file_that_imports_running_or_data_code(tmp_path, monkeypatch):
    """The rule is not vacuous: a method file importing the runner, a data file importing it, and a component
    importing numpy are all reported."""
    fake = tmp_path / "denseclip"
    (fake / "data").mkdir(parents=True)
    (fake / "run").mkdir()
    for init in (fake / "__init__.py", fake / "data" / "__init__.py", fake / "run" / "__init__.py"):
        init.write_text("")
    (fake / "run" / "evaluate.py").write_text("")
    (fake / "data" / "options.py").write_text("")
    (fake / "segmentor.py").write_text("from .run.evaluate import x\n\n\ndef f():\n    from .data import options\n")
    (fake / "data" / "coco.py").write_text("from ..run import evaluate\n")
    (fake / "fpn.py").write_text("import numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations(fake / "segmentor.py") == [
        "segmentor.py: the method imports denseclip.data (data layer)",
        "segmentor.py: the method imports denseclip.data.options (data layer)",
        "segmentor.py: the method imports denseclip.run.evaluate (run layer)"]
    assert violations(fake / "data" / "coco.py") == [
        "coco.py: the data layer imports denseclip.run (running)",
        "coco.py: the data layer imports denseclip.run.evaluate (running)"]
    assert violations(fake / "fpn.py") == [
        "fpn.py: a component file imports numpy (only the standard library and torch)"]


def test_no_import_cycles():
    graph = {module_name(p): {m for m in imports(p) if is_ours(m) and m.startswith("denseclip")}
             for p in sorted((ROOT / "denseclip").rglob("*.py"))}
    for name in graph:  # a package's modules import their package's __init__ implicitly: not an edge we check
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_files_and_functions_fit_on_a_few_screens():
    long_files = [f"{p.relative_to(ROOT)}: {n} lines" for p in our_files()
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                      for p in our_files() for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_every_package_is_installed():
    """setup.cfg lists every package folder: a plain (non-editable) `pip install .` would silently leave out one
    that it does not name."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {name.strip() for name in cfg["options"]["packages"].split(",")}
    folders = {module_name(init) for init in (ROOT / "denseclip").rglob("__init__.py")}
    assert listed == folders
