"""A package's public names, imported on first use.

Each package's ``__init__.py`` names its surface with `lazy`: ``from serving import
create_app`` works, and ``import serving.ranker`` does not drag torch in through a sibling
module that needs it (the server process must stay torch-free).

    >>> __getattr__, __all__ = lazy(__name__, {"create_app": "serving.app"})
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """(a module ``__getattr__`` resolving each name from its module, the ``__all__`` list)."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__, sorted(names)
