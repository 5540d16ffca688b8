"""The package's import rules (docs/ARCHITECTURE.md), checked on the source of every module:
layers import only from layers below them, nothing imports the CLI, no module imports another
module's underscore names, and no module grows past 500 lines."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmr_ext"

#: Bottom to top, as in docs/ARCHITECTURE.md; a module may import its own layer and those below.
LAYERS = [
    ("math",),
    ("checks", "outputs", "allocator"),
    ("nn",),
    ("native",),
    ("geometry",),
    ("losses", "attacks"),
    ("certify",),
    ("evaluation", "evaluation_records", "curves"),
    ("train",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
TOP = {"__init__", "_C"}  # the package's public face and the compiled library
MAX_LINES = 500


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def component(path: Path) -> str:
    """'geometry' for mmr_ext/geometry/engine.py, 'losses' for mmr_ext/losses.py."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def module_name(path: Path) -> str:
    parts = ("mmr_ext",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(absolute module, imported names) of every mmr_ext import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "mmr_ext" or target.startswith("mmr_ext."):
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mmr_ext"):
                    yield a.name, [], node.lineno


def test_every_module_is_placed_in_a_layer():
    unknown = {component(p) for p in modules()} - set(RANK) - TOP
    assert not unknown, f"modules without a layer in docs/ARCHITECTURE.md and LAYERS: {sorted(unknown)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    here = component(path)
    if here in TOP:
        return
    for target, names, line in imports(path):
        parts = target.split(".")
        there = parts[1] if len(parts) > 1 else None
        if there is None:  # `from mmr_ext import x` / `from .. import x`: x names the component
            for name in names:
                if name == "_C":
                    assert here == "native", f"{path.name}:{line}: only mmr_ext.native touches the compiled library"
                elif name != "__version__":
                    assert name in RANK, f"{path.name}:{line} imports {name} from the package root"
                    assert RANK[name] <= RANK[here], \
                        f"{path.name}:{line}: {here} (layer {RANK[here]}) imports {name} from above"
            continue
        if there == "_C":
            assert here == "native", f"{path.name}:{line}: only mmr_ext.native touches the compiled library"
            continue
        assert there in RANK, f"{path.name}:{line} imports unknown component {target}"
        assert RANK[there] <= RANK[here], \
            f"{path}:{line}: {here} (layer {RANK[here]}) imports {target} (layer {RANK[there]}) from above"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path):
    for target, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__") and n != "_C"]
        assert not private, f"{path.name}:{line} imports private names {private} from {target}"


def test_nothing_imports_the_cli():
    for path in modules():
        if path.name == "__main__.py":
            continue
        for target, names, line in imports(path):
            assert target != "mmr_ext.cli" and "cli" not in names, f"{path}:{line} imports the CLI"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {MAX_LINES})"
