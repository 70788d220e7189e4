import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The pure-PyTorch reference (python/) is importable in tests without being installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import pytest  # noqa: E402
from helpers import make_vit  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the end-to-end tests marked slow (skipped by default to keep CI short)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test of minutes; runs only with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cls", "reg4-avg"])
def small_vit(request):
    """Two small ViTs: CLS pooling with 1 prefix token; 4 register tokens + 'avg' pooling (k = 5)."""
    if request.param == "cls":
        return make_vit()
    return make_vit(embed_dim=24, depth=4, heads=3, reg_tokens=4, global_pool="avg", img=24)
