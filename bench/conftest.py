"""pytest-benchmark suite setup (`pytest bench/ --benchmark-only`): see bench/README.md.

--quick: one shape per model family and op (benchmarks.QUICK), what a short GPU session runs.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # `import common` as the scripts do


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="benchmark one shape per model family and op")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    keep = [item for item in items if getattr(item, "callspec", None) is None or item.callspec.params.get("quick", True)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="session")
def ceilings():
    """The device's matmul and copy ceilings, measured once per session (floors divide by them)."""
    import torch

    from fastsiglip import benchmarks

    return benchmarks.measure_ceilings(torch.bfloat16, "cuda")
