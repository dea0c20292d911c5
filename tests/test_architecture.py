"""The package's layers (docs/architecture.md): import-linter's contracts in pyproject.toml, no
underscore name imported from another module, and imports inside functions only where they keep a
heavy dependency out of a light module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bound_tuner"
# what a function-level import may keep out of a module that does not load it already
HEAVY = frozenset(
    {"torch", "torchvision", "plotly", "ray", "optuna_dashboard", "diffusers", "scipy"}
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (for ``from package import name``, the submodule
    when ``name`` is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules()]
    return subs if len(subs) == len(node.names) else [base, *subs]


def top_level_imports(name: str) -> set[str]:
    """The modules ``name`` imports when it is imported (module level, outside TYPE_CHECKING),
    with its parent packages."""
    out: set[str] = set()
    parts = name.split(".")
    out.update(".".join(parts[:k]) for k in range(1, len(parts)))
    for node in modules()[name].body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(imported(node))
        elif isinstance(node, (ast.If, ast.Try)) and not (
            isinstance(node, ast.If) and is_type_checking(node)
        ):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    out.update(imported(sub))
    return out


@cache
def heavy_of(name: str) -> frozenset[str]:
    """The heavy packages that importing ``name`` loads (transitively, module level only)."""
    seen, todo, heavy = set(), [name], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        root = m.split(".")[0]
        if root in HEAVY:
            heavy.add(root)
        elif m in modules():
            todo.extend(top_level_imports(m))
    return frozenset(heavy)


def function_imports():
    """(module, line, imported module, has a comment) for each import of a bound_tuner module
    inside a function. A comment on the line above a run of imports covers the run."""
    for name, tree in modules().items():
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        lines = path.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in ast.walk(fn):
                body = getattr(block, "body", None)
                if not isinstance(body, list):
                    continue
                run_start = None
                for node in body:
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        run_start = None
                        continue
                    run_start = run_start or node.lineno
                    if not (node.module if isinstance(node, ast.ImportFrom) else "").startswith(
                        "bound_tuner"
                    ):
                        continue
                    text = "\n".join(lines[run_start - 2 : node.end_lineno])
                    for target in imported(node):
                        yield name, node.lineno, target, "#" in text


def test_layers_hold_under_import_linter():
    """The layers, forbidden imports and acyclic siblings of pyproject.toml hold."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, 'import-linter is missing: pip install -e ".[dev]"'
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_module_imports_an_underscore_name_from_another():
    offenders = []
    for folder in ("bound_tuner", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "bound_tuner"
                ):
                    offenders += [
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_")
                    ]
    assert offenders == []


def test_imports_inside_functions_keep_a_heavy_dependency_out():
    """An import of a bound_tuner module inside a function must keep something heavy (torch,
    plotly, Ray, optuna-dashboard, diffusers, ...) out of a module that does not load it, and
    say so in a comment; any other import goes to the top of the module."""
    needless, silent = [], []
    for name, line, target, commented in function_imports():
        if target not in modules():
            continue
        if heavy_of(target) <= heavy_of(name):
            needless.append(f"{name}:{line} imports {target}")
        elif not commented:
            silent.append(f"{name}:{line} imports {target}")
    assert needless == [], "move these imports to the top of their modules"
    assert silent == [], "say in a comment what these imports keep out"


def test_the_light_modules_stay_light():
    """``bound-tuner --help``, spec parsing and the storage open without torch."""
    cli = [m for m in modules() if m.startswith("bound_tuner.cli.")]
    assert "bound_tuner.cli.parser" in cli and "bound_tuner.cli.process" in cli
    config = ("schema", "spec", "validate", "search", "overrides", "fingerprint")
    storage = ("artifacts", "keeper", "trained", "exports")
    light = ["bound_tuner", "bound_tuner.cli", *cli]
    light += [f"bound_tuner.config.{m}" for m in config]
    light += [f"bound_tuner.storage.{m}" for m in storage]
    for name in light:
        assert "torch" not in heavy_of(name), name
    code = "import sys, bound_tuner.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("layer", ["maths", "training", "evaluation", "models", "data"])
def test_heavy_analysis_sees_torch_in_the_lower_layers(layer):
    """The static analysis above is not vacuous: it finds torch where it is imported."""
    assert any("torch" in heavy_of(m) for m in modules() if m.startswith(f"bound_tuner.{layer}"))
