"""The package's import graph, read from the source (ast, nothing imported): leaves never reach up.

Components (models, rewards, samplers, algorithms) and the config package are what the CLI, the
reward server and outside plugins build on; if one of them imported the CLI or the trainer, every
user of it would pull in the whole training stack, and a change there could break a reward. The
config package must stay torch-free, so it may see a component only through its schemas.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "pcpo_hydra"
# The shapes world leaves the package for a plugin of its own; its modules are not held to these rules.

LEAVES = ("models", "rewards", "samplers", "algorithms", "config")
TOP = ("pcpo_hydra.train", "pcpo_hydra.build", "pcpo_hydra.loop")


def module_name(path: Path, root: Path) -> str:
    """pcpo_hydra/rewards/jpeg.py -> pcpo_hydra.rewards.jpeg; a package's __init__.py is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    """Whether `name` is a module or package in the tree under `root`."""
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module `path` imports anywhere (top level, in functions, under TYPE_CHECKING).

    `from pkg import name` counts as importing pkg.name when that is a module of the tree, else pkg;
    relative imports are resolved against the module's own package.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if is_module(full, root) else base)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def graph() -> dict[str, set[str]]:
    """Module -> the pcpo_hydra modules it imports, for every module of the package."""
    edges = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name = module_name(path, SRC)
        edges[name] = {target for target in imports_of(path, SRC) if within(target, PACKAGE)}
    return edges


def is_schemas(name: str) -> bool:
    return name.rpartition(".")[2] == "schemas"


def forbidden(module: str, target: str) -> str | None:
    """Why `module` may not import `target`, or None when it may."""
    leaf = next((leaf for leaf in LEAVES if within(module, f"{PACKAGE}.{leaf}")), None)
    if leaf and any(within(target, top) for top in TOP):
        return f"{leaf}/ is built on by the CLI and the trainer, never the other way round"
    if leaf == "config":
        if within(target, f"{PACKAGE}.world"):
            return "config/ must not know the shapes world (a plugin)"
        for component in ("models", "rewards"):
            if within(target, f"{PACKAGE}.{component}") and not is_schemas(target):
                return f"config/ sees {component}/ only through its schemas (torch-free validation)"
    if leaf == "models" and within(target, f"{PACKAGE}.rewards"):
        return "models/ must not depend on rewards/"
    if leaf == "rewards" and within(target, f"{PACKAGE}.models") and target != f"{PACKAGE}.models.schemas":
        return "rewards/ may use models/ only through models.schemas"
    return None


def test_the_graph_is_read_from_every_module() -> None:
    edges = graph()
    assert len(edges) > 60 and f"{PACKAGE}.rewards.world" not in edges and f"{PACKAGE}.world" not in edges
    assert f"{PACKAGE}.config.hydra_setup" in edges[f"{PACKAGE}.rewards.server"]
    assert f"{PACKAGE}.weights" in edges[f"{PACKAGE}.rewards.clip_score"]  # a `from pkg import (...)` line


def test_relative_and_package_imports_resolve_to_their_modules(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for module in ("__init__", "a", "sub/__init__", "sub/b"):
        (pkg / f"{module}.py").write_text("")
    (pkg / "sub" / "c.py").write_text(
        "from . import b\nfrom .. import a\nfrom ..a import thing\nfrom pkg import sub\n"
        "def f():\n    import pkg.a\n    from pkg.sub import name\n")
    assert imports_of(pkg / "sub" / "c.py", tmp_path) == {"pkg.sub.b", "pkg.a", "pkg.sub"}


@pytest.mark.parametrize(("module", "target", "allowed"), [
    ("pcpo_hydra.rewards.server", "pcpo_hydra.train", False),
    ("pcpo_hydra.config.validation", "pcpo_hydra.rewards.health", False),
    ("pcpo_hydra.config.registry", "pcpo_hydra.rewards.schemas", True),
    ("pcpo_hydra.rewards.hpsv2", "pcpo_hydra.models.base", False),
    ("pcpo_hydra.rewards.hpsv2", "pcpo_hydra.models.schemas", True),
    ("pcpo_hydra.models.base", "pcpo_hydra.rewards.base", False),
    ("pcpo_hydra.train", "pcpo_hydra.build", True),
])
def test_the_rules_tell_allowed_edges_from_forbidden_ones(module: str, target: str, allowed: bool) -> None:
    assert (forbidden(module, target) is None) is allowed


def test_no_leaf_package_reaches_up_or_across() -> None:
    broken = sorted(f"{module} imports {target}: {why}" for module, targets in graph().items()
                    for target in targets if (why := forbidden(module, target)))
    assert broken == []
