import os

import pytest

from tests.fixtures.movielens_files import write_grouplens

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def home(tmp_path):
    from producers.warehouse import Home

    return Home.resolve(tmp_path / "home")


@pytest.fixture
def grouplens(tmp_path):
    """A fresh small MovieLens folder in the GroupLens layout."""
    return write_grouplens(tmp_path / "ml-100k")
