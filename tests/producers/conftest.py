"""Fixtures the producer tests share."""
from __future__ import annotations

from pathlib import Path

import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home
from tests.fixtures.movielens_files import write_grouplens
from validation.run import ValidateConfig, validate


@pytest.fixture(scope="module")
def validated_grouplens(tmp_path_factory) -> tuple[Home, Path]:
    """A home with the small GroupLens fixture (12 users, 20-30 ratings each) ingested and validated, and the
    raw folder; one per test module (module scope), so a module's stages never see another module's tables."""
    root = tmp_path_factory.mktemp("grouplens")
    source = write_grouplens(root / "ml-100k")
    home = Home.resolve(root / "home")
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=source))
    assert validate(home, "movielens-100k", ValidateConfig(data_docs=False)).success
    return home, source
