"""The import graph points one way: config and the network at the bottom, the CLI at the top.

Imports are read with ast (module-level and inside functions alike), so a lazy import of a module
above is caught as surely as a top-level one. A new module must be given a layer here."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gpt2mh"

# Lowest first. A module may import only modules of lower layers (never its own layer or above).
LAYERS = [
    ("leaves: stdlib/torch only", {"config", "atomic", "prompt", "hub", "sampling", "metrics"}),
    ("the network; data in", {"model", "inputs", "data", "tokenizer", "packing"}),
    ("kernels, weights on disk", {"linear", "weights", "corpus"}),
    ("int8, decoding, checkpoints", {"quantize", "generate", "checkpoint"}),
    ("scoring, metrics", {"score", "evaluate", "baselines"}),
    ("user API, fine-tuning, export", {"api", "train", "export"}),
    ("demo", {"quickstart"}),
    ("command line", {"cli"}),
    ("entry point", {"__main__"}),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(gpt2mh module, at module level?) for every import of the package in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "gpt2mh":
                rest = node.module.split(".")[1:]
                names = rest[:1] if rest else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("gpt2mh.")]
        found += [(n.split(".")[0], id(node) in top) for n in names]
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py"))


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "__init__" and m not in LAYER]
    assert not missing, f"place these modules in a layer of LAYERS: {missing}"


@pytest.mark.parametrize("name", [m for m in modules() if m != "__init__"])
def test_imports_point_down(name):
    above = sorted({dep for dep, _ in package_imports(PKG / f"{name}.py") if LAYER.get(dep, -1) >= LAYER[name]})
    assert not above, f"gpt2mh/{name}.py imports {above}, which are not below it (layer {LAYER[name]})"


def test_package_init_is_a_lazy_facade():
    # `import gpt2mh.model` runs gpt2mh/__init__.py first: at module level it may import only config.
    eager = sorted({dep for dep, top in package_imports(PKG / "__init__.py") if top})
    assert eager == ["config"]


def test_model_imports_only_torch_and_config():
    tree = ast.parse((PKG / "model.py").read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add("." + (node.module or "") if node.level else node.module.split(".")[0])
    assert roots <= {"__future__", "math", "typing", "torch", ".config"}, roots


def test_no_cycles():
    graph = {m: {d for d, _ in package_imports(PKG / f"{m}.py")} for m in modules() if m != "__init__"}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) != 2:
            state[m] = 1
            for d in sorted(graph.get(m, ())):
                visit(d, path + [m])
            state[m] = 2

    for m in graph:
        visit(m, [])


def test_the_parser_sees_lazy_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from .a import b\nimport gpt2mh.c\ndef f():\n    from . import d\n    from gpt2mh.e import g\n")
    assert package_imports(path) == [("a", True), ("c", True), ("d", False), ("e", False)]


@pytest.mark.slow  # spawns a Python process
def test_importing_the_network_loads_nothing_else():
    code = "import gpt2mh.model, sys; print(sorted(m for m in sys.modules if m.startswith('gpt2mh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    assert out.strip() == "['gpt2mh', 'gpt2mh.config', 'gpt2mh.model']"
