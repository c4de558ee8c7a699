"""Shared test set-up: the `gpu` marker skips only where no CUDA device exists,
and every test starts from its own seed (different inputs per test, reproducible)."""
import os
import zlib

# numpy (the Triton interpreter's engine) on one thread per xdist worker: with two workers
# on two cores, OpenBLAS threads otherwise fight and tests run ~3x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import fastbone  # noqa: E402,F401  (sets up Triton's interpreter before any test module imports triton)
import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
