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


# xdist groups that run on one worker for many minutes (the sm_90 compiles of every Triton launch, nvcc's
# resource reports): collected first, so that pytest-xdist's loadgroup scheduler starts them at once and the
# other worker takes the rest meanwhile, rather than one of them running alone at the end.
LONG_GROUPS = ("triton_sm90_compile", "cuda_spills")


def _long_group_rank(item) -> int:
    marker = item.get_closest_marker("xdist_group")
    name = marker.args[0] if marker and marker.args else marker.kwargs.get("name") if marker else None
    return 0 if name in LONG_GROUPS else 1


_SPLIT_GROUP = pytest.StashKey[str]()


def _check_groups_took_effect(config, items):
    """On an xdist worker under --dist loadgroup, every xdist_group test must carry pytest-xdist's group tag in
    its id (the tag is what keeps a group on one worker). With pytest 9.2 and pytest-xdist 3.8 the tag
    silently has no effect (pytest-xdist issue 1386): the LONG_GROUPS' tests then land on both workers, and
    the one that does not compile waits on the other's lock for the whole compile (17 idle minutes of CI).
    Such tests fail at setup, before their fixtures run, saying why."""
    if not getattr(config.option, "loadgroup", False):
        return
    untagged = [item for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if untagged:
        import importlib.metadata as metadata

        versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("pytest", "pytest-xdist"))
        for item in untagged:
            item.stash[_SPLIT_GROUP] = (f"--dist loadgroup has no effect with {versions}: this xdist_group test and "
                                        f"{len(untagged) - 1} others would be split across workers (pytest-xdist "
                                        "issue 1386); install the versions requirements-dev.txt allows")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    message = item.stash.get(_SPLIT_GROUP, None)
    if message:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which tags grouped tests
def pytest_collection_modifyitems(config, items):
    _check_groups_took_effect(config, items)
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    items.sort(key=_long_group_rank)  # stable: the order within each part is kept


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
