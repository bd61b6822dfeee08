"""`llm4es publish` and `evaluate` through the CLI, on a fixture warehouse with a tiny model's embeddings."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from producers.stores.warehouse import Home
from tests.cli.conftest import assert_clean_exit_1
from tests.fixtures.movielens_files import write_grouplens
from tests.fixtures.tiny_model import save_tiny_model, trained_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = trained_tokenizer(["1997-10-05 14:02, Toy Story, 1995, Animation, Children's, Comedy, 4"] * 30, 350)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tok)


def test_publish_then_evaluate_from_feast(llm4es, tmp_path, model_dir):
    source = write_grouplens(tmp_path / "ml", n_users=40, n_movies=30, per_user=(20, 22))
    assert llm4es("publish", "movielens-100k").exit_code != 0  # nothing ingested yet
    for args in (("ingest", "movielens-100k", "--source", source), ("validate", "movielens-100k", "--no-data-docs")):
        assert llm4es(*args).exit_code == 0
    nothing = llm4es("publish", "movielens-100k")
    assert_clean_exit_1(nothing)
    assert "nothing to publish" in nothing.output and "llm4es aggregate" in nothing.output

    for args in (("aggregate", "movielens-100k"),
                 ("serialize", "movielens-100k", "--model", model_dir, "--max-tokens", "200"),
                 ("embed", "movielens-100k", "--model", model_dir, "--max-length", "128", "--layers", "1:")):
        result = llm4es(*args)
        assert result.exit_code == 0, result.output

    published = llm4es("publish", "movielens-100k", "--materialize")
    assert published.exit_code == 0, published.output
    assert "movielens_100k__llm4es_embedding (default)" in published.output
    assert "movielens_100k__agg_features" in published.output and "online store filled" in published.output

    mixed = llm4es("evaluate", "movielens-100k", "--features", "agg+llm4es", "--fusion", "none", "--fusion", "stack")
    assert mixed.exit_code == 2 and "--fusion" in mixed.output
    evaluated = llm4es("evaluate", "movielens-100k", "--features", "agg,llm4es,agg+llm4es", "--cv-repeats", "1",
                       "--fusion", "stack", "--fusion", "mean")
    assert evaluated.exit_code == 0, evaluated.output
    for name in ("agg", "llm4es", "agg+llm4es"):
        assert f"│ {name} " in evaluated.output
    assert "gender roc_auc" in evaluated.output and "age mae" in evaluated.output
    report = json.loads((tmp_path / "home" / "reports" / "evaluate" / "movielens_100k" / "evaluation.json").read_text())
    assert report["n_users"] == 40 and report["coverage"]["movielens_100k__llm4es_embedding"] == 1.0
    entry = report["results"]["gender"]["agg+llm4es"]
    embeddings = next((tmp_path / "home" / "data" / "movielens_100k" / "embeddings").glob("*.parquet"))
    dim = pq.read_table(embeddings)["dim"][0].as_py()
    assert entry["n_features"] - dim == report["results"]["gender"]["agg"]["n_features"] > 0
    assert len(entry["protocols"]["paper"]["roc_auc"]["scores"]) == 5
    assert report["feature_sets"][-2:] == ["agg+llm4es (stacked)", "agg+llm4es (mean)"]
    assert report["results"]["age"]["agg+llm4es (mean)"]["reader"] == "fusion: mean"

    # what a downstream service reads online equals the offline file
    from producers.publish import online_features

    home = Home.resolve(tmp_path / "home")
    online = online_features(home, "movielens-100k", ["llm4es_embedding"], [1, 2, 3])
    offline = pq.read_table(next((home.data_dir / "movielens_100k" / "embeddings").glob("*.parquet"))).to_pandas()
    for uid, vec in zip(online["user_id"], online["movielens_100k__llm4es_embedding__vector"]):
        expected = offline.loc[offline["user_id"] == uid, "vector"].iloc[0]
        assert np.array_equal(np.asarray(vec, dtype=np.float32), np.asarray(expected, dtype=np.float32))


def test_evaluate_before_publish_says_what_to_run(llm4es, grouplens):
    for args in (("ingest", "movielens-100k", "--source", grouplens), ("validate", "movielens-100k", "--no-data-docs")):
        assert llm4es(*args).exit_code == 0
    result = llm4es("evaluate", "movielens-100k", "--features", "agg")
    assert_clean_exit_1(result)
    assert "llm4es aggregate" in result.output and "llm4es publish" in result.output


def test_evaluate_defaults_to_the_published_feature_sets(llm4es, tmp_path):
    source = write_grouplens(tmp_path / "ml", n_users=40, n_movies=30, per_user=(20, 22))
    for args in (("ingest", "movielens-100k", "--source", source), ("validate", "movielens-100k", "--no-data-docs"),
                 ("aggregate", "movielens-100k"), ("publish", "movielens-100k")):
        result = llm4es(*args)
        assert result.exit_code == 0, result.output
    evaluated = llm4es("evaluate", "movielens-100k", "--target", "age", "--protocol", "paper")
    assert evaluated.exit_code == 0, evaluated.output
    assert "│ agg " in evaluated.output and "│ coles " not in evaluated.output
    for name in ("coles", "llm4es", "coles+llm4es", "coles+agg"):
        assert f"not evaluated: {name} (" in evaluated.output
    assert "llm4es coles" in evaluated.output and "llm4es embed" in evaluated.output


def test_refresh_without_an_llm4es_set_names_no_model(llm4es, monkeypatch):
    """A bank serving only aggregates and CoLES read `model None at None` after every refresh."""
    from types import SimpleNamespace

    from producers.pipeline import Pipeline

    result = SimpleNamespace(nothing_new=False, users=["C1"], as_of="2024-06-29 21:56:12", since="2024-06-28 23:59:11",
                             refreshed=["coles", "agg"], model=None, checkpoint=None, gate={}, not_refreshed=[],
                             seconds={}, snapshot_dir="snap")
    monkeypatch.setattr(Pipeline, "refresh", lambda self, dataset, config: result)
    out = llm4es("refresh", "mybank")
    assert out.exit_code == 0 and "refreshed 1 users" in out.output and "coles, agg" in out.output, out.output
    assert "None" not in out.output
