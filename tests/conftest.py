"""Suite-wide settings, and a disk budget: each test module's temporary folders go when it ends.

The real-model modules write several MoE checkpoints and DeepSpeed states each (gigabytes).
pytest alone keeps every one until the session ends (and the last three sessions after it), so
the whole suite once peaked near 16 GB and filled a CI disk. Here, a passed test's ``tmp_path``
goes at once (``tmp_path_retention_policy = failed`` in setup.cfg) and a module's
``tmp_path_factory`` folders go when the module ends, unless one of its tests failed (kept to
debug).

Layout: one folder per feature (build/, train/, parallel/, slurm/, cli/, models/, data/, eval/); shared
builders and helpers, and the scripts tests run as subprocesses, in tests/fixtures/ (no test module imports
another). Fixtures used by modules of several folders are defined here.
"""

import os
import shutil

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


LONGEST_FIRST = ("slurm", "slow", "heavy", "dist")
"""Test files go in this order of their marks (then as collected): `make test` runs two pytest-xdist workers
with `--dist loadfile --no-loadscope-reorder`, which hand out whole files in this order, so the files of
minutes start first and the short ones fill in beside them (xdist's own order, most tests first, left the
SLURM and demo files to run one after another at the end). Only one SLURM file goes first (see below)."""


def pytest_collection_modifyitems(config, items):
    tier = {}
    for item in items:
        marks = [i for i, m in enumerate(LONGEST_FIRST) if item.get_closest_marker(m)]
        tier[item.path] = min([tier.get(item.path, len(LONGEST_FIRST)), *marks])
    # the other SLURM files go last: two local clusters at once could take each other's srun ports (their
    # SrunPortRange is not reserved), and the first file is long done by then
    slurm = list(dict.fromkeys(item.path for item in items if item.get_closest_marker("slurm")))
    tier |= dict.fromkeys(slurm[1:], len(LONGEST_FIRST) + 1)
    collected = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (tier[item.path], collected[item.path]))  # stable: a file keeps its order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.module.__dict__.setdefault("__dive_failed__", True)
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_temp_budget(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__dict__.get("__dive_failed__"):
        return
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def world():
    """A 1-rank process group for in-process DeepSpeed runs (set up once)."""
    from dive_ds.parallel.distributed import teardown_distributed
    from tests.fixtures.train_setup import start_world

    if "RANK" in os.environ and os.environ.get("WORLD_SIZE") != "1":
        pytest.skip(
            "the in-process retraining tests need a 1-rank process group, and pytest runs under a "
            "multi-rank launcher here; run pytest directly (multi-rank runs are tested via torchrun)"
        )
    start_world()
    yield
    teardown_distributed()
