"""``--without PACKAGE`` (repeatable): run the suite as if an optional package were not installed, e.g.
``python -m pytest --without torch --without onnx_graphsurgeon``. The package's entry in sys.modules is
set to None, so ``import PACKAGE`` raises ModuleNotFoundError and ``pytest.importorskip`` skips, as on a
machine without it. (tests/ and the checkout are on sys.path from pyproject's ``pythonpath``.)"""

from __future__ import annotations

import sys

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--without", action="append", default=[], metavar="PACKAGE",
                     help="hide an installed optional package (torch, onnx_graphsurgeon) from the tests")


def pytest_configure(config: pytest.Config) -> None:
    for name in config.getoption("without"):
        if sys.modules.get(name) is not None:
            raise pytest.UsageError(f"--without {name}: it is imported already, before the tests")
        sys.modules[name] = None  # type: ignore[assignment]
