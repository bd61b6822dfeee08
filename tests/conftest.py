import os

import pytest

from tests.fixtures.movielens_files import write_grouplens

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """The suite runs on the CPU even on a GPU machine: `auto` devices (embed, finetune) read
    LLM4ES_DEVICE, so invariance and resume tolerances meant for float32 on a CPU hold there too.
    Tests marked `cuda` (tests/training/test_cuda.py) choose their device themselves."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("LLM4ES_DEVICE", "cpu")


@pytest.fixture
def home(tmp_path):
    from producers.stores.warehouse import Home

    return Home.resolve(tmp_path / "home")


@pytest.fixture
def grouplens(tmp_path):
    """A fresh small MovieLens folder in the GroupLens layout."""
    return write_grouplens(tmp_path / "ml-100k")
