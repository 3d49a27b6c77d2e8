"""Suite-wide settings, and a disk budget: each test module's temporary folders go when it ends.

The real-model modules write several MoE checkpoints and DeepSpeed states each (gigabytes).
pytest alone keeps every one until the session ends (and the last three sessions after it), so
the whole suite once peaked near 16 GB and filled a CI disk. Here, a passed test's ``tmp_path``
goes at once (``tmp_path_retention_policy = failed`` in setup.cfg) and a module's
``tmp_path_factory`` folders go when the module ends, unless one of its tests failed (kept to
debug).
"""

import os
import shutil

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
