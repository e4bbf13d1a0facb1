"""The layering DESIGN.md asks for, checked on the imports themselves (no root, no binaries).

`cni/` is a library (like libcni) that knows nothing of criopy; pod sandboxes
and containers depend one way only (containers run in sandboxes).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imports_of(package: str) -> dict[str, set[str]]:
    """Each module of `package` (a path like "cni" or "cri/containers") -> the modules it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(REPO))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for module, names in imports_of(package).items():
        bad = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            out[module] = bad
    return out


def test_cni_imports_nothing_of_criopy() -> None:
    assert offenders("cni", ("cri", "podsandbox")) == {}


def test_podsandbox_does_not_import_the_containers() -> None:
    assert offenders("podsandbox", ("cri.containers",)) == {}


def test_the_checker_sees_an_import_it_forbids() -> None:
    """The check itself: containers do import podsandbox, which is allowed, and it is seen."""
    assert "cri/containers/manager.py" in offenders("cri/containers", ("podsandbox",))


def test_the_root_of_cri_is_a_handful_of_modules_beside_its_packages() -> None:
    modules = sorted(p.name for p in (REPO / "cri").glob("*.py"))
    assert len(modules) <= 8, modules
