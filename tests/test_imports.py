"""The module graph: no import cycles, and imports inside functions only for optional or heavy dependencies.

Every `import` statement is read with `ast`, including those inside functions (a function-level
import hides a cycle from Python but not from this walk). Project modules are those under libs/,
tools/, scripts/, configs/, benchmarks/ and the top-level scripts.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("libs", "tools", "scripts", "configs", "benchmarks")
REASON = re.compile(r"#\s*(optional|heavy)\b")  # the one-word reasons a function-level import may give


def _project_files():
    """{module name: path} of every project module."""
    files = {}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            files[name[:-3]] = os.path.join(ROOT, name)
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    files[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return files


FILES = _project_files()


def _imports(path):
    """[(imported project module, line, inside a function?)] of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name in FILES:
                    found.append((name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {module: sorted({name for name, _, _ in _imports(path) if name != module}) for module, path in FILES.items()}


def _find_cycle(graph):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_the_known_edges():
    # Guards the walker itself: these edges exist, so a walk that found none would pass vacuously.
    assert "libs.trainer" in GRAPH["train"]
    assert any(name.startswith("libs.") for name in GRAPH["libs.trainer"])


def test_benchmarks_do_not_import_the_tests():
    for module, path in FILES.items():
        if module.startswith("benchmarks."):
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            assert not [n for n in names if n == "tests" or n.startswith("tests.")], f"{path} imports tests/"


def test_the_library_imports_nothing_from_tools():
    """tools/ are command lines over libs/; what a script and a tool share lives in libs/."""
    up = {module: [t for t in targets if t.startswith("tools.")] for module, targets in GRAPH.items()
          if module.startswith("libs.")}
    assert len(up) > 30 and not any(up.values()), {m: t for m, t in up.items() if t}


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": ["b"], "b": []}) is None


def test_the_walk_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import libs.errors\n\n\ndef f():\n    from libs.nnet import build_nnet\n")
    assert ("libs.errors", 1, False) in _imports(str(path)) and ("libs.nnet", 5, True) in _imports(str(path))


@pytest.mark.parametrize("module", sorted(FILES))
def test_project_modules_are_imported_at_the_top(module):
    """A project module imported inside a function is a hidden dependency (or a hidden cycle)."""
    inner = [(name, line) for name, line, in_function in _imports(FILES[module]) if in_function]
    assert not inner, f"{FILES[module]}: project imports inside functions: {inner}"


def _imports_without_reason(source, path="<string>"):
    """Line numbers of imports inside functions whose line lacks `# optional` or `# heavy`."""
    lines = source.splitlines()
    missing = set()
    for fn in ast.walk(ast.parse(source, path)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not REASON.search(lines[node.lineno - 1]):
                    missing.add(node.lineno)
    return sorted(missing)


def test_the_reason_check_flags_a_bare_import():
    source = "def f():\n    import wandb\n    import xformers  # optional\n    import numpy  # fast\n"
    assert _imports_without_reason(source) == [2, 4]


@pytest.mark.parametrize("module", sorted(FILES))
def test_function_level_imports_say_why(module):
    """Third-party imports inside functions are for optional or heavy dependencies: a comment says which."""
    path = FILES[module]
    missing = _imports_without_reason(open(path, encoding="utf-8").read(), path)
    assert not missing, f"{path}: function-level imports without '# optional' or '# heavy' at lines {missing}"


def _design_map():
    """[(module, [imported modules])] of the map in docs/DESIGN.md, top line first."""
    text = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    block = text.split("```text module-map\n", 1)[1].split("```", 1)[0]
    rows = []
    for line in block.splitlines():
        if "->" in line and not line.lstrip().startswith("#"):
            left, right = line.split("->")
            rows += [(module.strip(), right.split()) for module in left.split(",")]
    return rows


def test_the_design_map_matches_the_imports():
    rows = _design_map()
    assert len(rows) > 20, "docs/DESIGN.md lost its module map"
    drawn = [module for module, _ in rows]
    for i, (module, targets) in enumerate(rows):
        assert module in GRAPH, f"docs/DESIGN.md draws {module}, which is not a module"
        for target in targets:
            assert target in GRAPH[module], f"docs/DESIGN.md draws {module} -> {target}; the code has no such import"
            assert target not in drawn[:i + 1], f"docs/DESIGN.md draws {module} -> {target} pointing up"
