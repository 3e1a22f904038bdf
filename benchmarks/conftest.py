"""pytest collection for the op microbenchmarks.

`pytest benchmarks/ --benchmark-only` collects benchmarks/bench_*.py (pytest
only looks at test_*.py by default). They are collected only when benchmarks/
(or a file in it) is named on the command line, so a bare `pytest` from the
root and `pytest tests` never run them.
"""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Scripts, not pytest modules.
NOT_PYTEST = {"bench_model.py", "bench_triton.py"}


def _asked(config) -> bool:
    for a in config.args:
        p = os.path.abspath(str(a).split("::")[0])
        if p == HERE or p.startswith(HERE + os.sep):
            return True
    return False


def pytest_collect_file(parent, file_path):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and str(file_path.parent) == HERE and file_path.name not in NOT_PYTEST
            and _asked(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

