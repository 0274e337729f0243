"""The package's own import graph (grimp), for what must follow the code: DVC stage deps, the training resume key."""

from __future__ import annotations

from functools import cache

import grimp

PACKAGE = "pipeline"


@cache
def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE, include_external_packages=False, cache_dir=None)  # ~10 ms: no cache folder


def imported_by(module: str) -> set[str]:
    """`module` and every package module it imports, directly or not, at any depth of a function."""
    return {module} | _graph().find_upstream_modules(module)
