"""The package's import structure: no two packages (or top-level modules) import each other, so that
the layers stand one above another (kernels, models, runtime, then the engine and its callers)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "localmoe"


def unit(module: str) -> str:
    """The package a module belongs to: localmoe.runtime.offload -> localmoe.runtime."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (ROOT / parts[1]).is_dir() else module


def imports() -> set[tuple[str, str]]:
    """(importer, imported) pairs between distinct units, from every module's import statements."""
    pairs = set()
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("localmoe."):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                targets = {unit(name) for name in names if _exists(name)}
            elif isinstance(node, ast.Import):
                targets = {unit(alias.name) for alias in node.names if alias.name.startswith("localmoe.")}
            else:
                continue
            pairs |= {(unit(module), target) for target in targets if target != unit(module)}
    return pairs


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (ROOT / relative).is_dir() or (ROOT / relative).with_suffix(".py").is_file()


def test_no_two_units_import_each_other():
    pairs = imports()
    assert pairs, "the import graph was not read"
    assert sorted((a, b) for a, b in pairs if (b, a) in pairs) == []


def test_models_and_kernels_know_nothing_of_the_runtime():
    pairs = imports()
    assert not {(a, b) for a, b in pairs if a in ("localmoe.models", "localmoe.kernels") and b == "localmoe.runtime"}
