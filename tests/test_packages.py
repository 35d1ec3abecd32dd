"""Each package names its public surface in its ``__init__.py``, and only that surface (and its
modules' public names) is used from outside the package."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recsys", "features", "streaming", "serving", "offline_eval", "commands")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_a_package_lists_resolves(name):
    package = importlib.import_module(name)
    assert package.__doc__ and package.__all__
    for public in package.__all__:
        assert getattr(package, public) is not None
    with pytest.raises(AttributeError, match="has no attribute"):
        package.no_such_name  # noqa: B018


def test_no_file_outside_a_package_imports_its_underscore_names():
    offences = []
    for path in [*ROOT.glob("*/**/*.py")]:
        if ".venv" in path.parts or "build" in path.parts:
            continue
        home = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                if node.module.split(".")[0] != home:
                    offences += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                 if a.name.startswith("_")]
    assert offences == []
