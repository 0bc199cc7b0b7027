"""pyproject's runtime dependencies are exactly what `smartdns/` imports: every third-party
import is a declared dependency, and every declared dependency is imported (a test-only
library such as dnslib belongs in the `test` extra)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _normalized(name: str) -> str:
    """PEP 503 form, so `PyYAML`, `pyyaml` and `asyncio_throttle`/`asyncio-throttle` compare."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = set()
    for requirement in project["dependencies"]:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        names.add(_normalized(match.group()))
    return names


def _imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere under smartdns/."""
    modules = set()
    for path in (REPO / "smartdns").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    return modules


def _imported_distributions() -> set[str]:
    owners = packages_distributions()
    third_party = _imported_modules() - set(sys.stdlib_module_names) - {"smartdns"}
    unknown = sorted(module for module in third_party if module not in owners)
    assert not unknown, f"imported but not installed: {unknown}"
    return {_normalized(dist) for module in third_party for dist in owners[module]}


def test_every_third_party_import_is_a_runtime_dependency() -> None:
    assert _imported_distributions() - _declared() == set()


def test_every_runtime_dependency_is_imported() -> None:
    assert _declared() - _imported_distributions() == set()


def test_dnslib_is_a_test_dependency_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "dnslib" not in _declared()
    test_extra = project["optional-dependencies"]["test"]
    assert any(_normalized(requirement).startswith("dnslib") for requirement in test_extra)
