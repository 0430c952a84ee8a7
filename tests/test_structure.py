"""The layout is the architecture: the package's folders are its layers, and imports point one way.

Units are the top-level modules (config.py, model.py, ...) and the sub-packages (weights/, kernels/,
inference/, ...). A module may import modules of its own unit and of units in lower layers, never a
unit of its own layer or above. Imports are read with ast (module-level and inside functions alike),
so a lazy import of a layer above is caught as surely as a top-level one. A new unit must be given a
layer here."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gpt2mh"

# Lowest first. A unit is a top-level module or a folder of gpt2mh/.
LAYERS = [
    ("shared argument checks", {"_checks"}),
    ("leaves: stdlib (torch at most)", {"config", "atomic"}),
    ("the network, the tokenizer, model inputs", {"model", "tokenizer", "inputs"}),
    ("weights on disk, kernels", {"weights", "kernels"}),
    ("inference: requests, the decode step, the engine", {"inference"}),
    ("user API, fine-tuning", {"api", "train"}),
    ("the demo", {"demo"}),
    ("the HTTP server", {"serve"}),
    ("command line", {"cli"}),
    ("entry point", {"__main__"}),
]
LAYER = {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def module_name(path: Path) -> str:
    """gpt2mh/inference/decode.py -> "inference.decode"; gpt2mh/cli/__init__.py -> "cli"."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    return module.split(".")[0]


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(gpt2mh module imported, at module level?) for every import of the package in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    here = module_name(path) if path.is_relative_to(PKG) else ""
    pkg = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    pkg = [p for p in pkg if p]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                if node.module:
                    names = [".".join(base + node.module.split("."))]
                else:
                    names = [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.split(".")[0] == "gpt2mh":
                rest = node.module.split(".")[1:]
                names = [".".join(rest)] if rest else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("gpt2mh.")]
        found += [(n, id(node) in top) for n in names]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py")) if module_name(p)}


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in modules()} - set(LAYER))
    assert not missing, f"place these modules or folders in a layer of LAYERS: {missing}"


def test_sub_packages_are_the_folders_of_the_layers():
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert set(folders) <= set(LAYER), folders
    assert not [p for p in PKG.iterdir() if p.is_dir() and not (p / "__init__.py").is_file()
                and p.name not in ("assets", "__pycache__") and any(p.glob("*.py"))]


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_point_down(name):
    own = unit(name)
    bad = sorted({dep for dep, _ in package_imports(modules()[name])
                  if unit(dep) != own and LAYER.get(unit(dep), -1) >= LAYER[own]})
    assert not bad, f"gpt2mh/{name} imports {bad}, which are not below its layer ({LAYERS[LAYER[own]][0]})"


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


def test_lazy_imports_only_in_the_command_line():
    # Inside a function an import hides the dependency graph; only cli/ needs them (`--help` stays fast).
    lazy = sorted(f"{name} -> {dep}" for name, path in modules().items() if unit(name) not in ("cli", "__init__")
                  and name != "" for dep, top in package_imports(path) if not top)
    assert lazy == [], lazy


def test_no_cycles():
    graph = {m: {d for d, _ in package_imports(p)} for m, p in modules().items()}
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


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from .a import b\nimport gpt2mh.c\ndef f():\n    from . import d\n    from gpt2mh.e.f import g\n")
    assert package_imports(path) == [("a", True), ("c", True), ("d", False), ("e.f", False)]
    assert module_name(PKG / "inference" / "decode.py") == "inference.decode"
    assert module_name(PKG / "cli" / "__init__.py") == "cli"


@pytest.mark.slow  # spawns a Python process
def test_importing_the_network_loads_nothing_else():
    code = "import gpt2mh.model, sys; print(sorted(m for m in sys.modules if m.startswith('gpt2mh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    assert out.strip() == "['gpt2mh', 'gpt2mh._checks', 'gpt2mh.config', 'gpt2mh.model']"


@pytest.mark.slow  # spawns a Python process
def test_the_command_lines_help_imports_no_torch():
    code = ("import sys; from gpt2mh.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'sentencepiece')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    assert out.strip() == "[]"
