"""The published repo works with Feast's own CLI, run from the home as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from producers.publish import default_project, online_features, publish
from producers.stores.warehouse import Home
from tests.feature_repo import files
from tests.feature_repo.conftest import T1, USERS, same_bits

FEAST = Path(sys.executable).parent / "feast"


def feast(home: Home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEAST_USAGE": "False"}
    env.pop("FEAST_FS_YAML_FILE_PATH", None)
    done = subprocess.run([str(FEAST), "-c", "feature_repo", *args], cwd=home.root, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_feast_cli_apply_and_materialize_incremental(tmp_path):
    home = Home.resolve(tmp_path / "home")
    _, vecs = files.embeddings_file(home.data_dir, "cli-test", T1, USERS)
    files.agg_file(home.data_dir, "cli-test", T1, USERS)
    publish(home, "cli-test")

    applied = feast(home, "apply")
    assert f"Applying changes for project {default_project(home)}" in applied.stdout
    now = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None).isoformat()
    materialized = feast(home, "materialize-incremental", now)
    assert "cli_test__llm4es_embedding" in materialized.stdout

    df = online_features(home, "cli-test", ["llm4es_embedding", "agg_features"], USERS)
    assert all(same_bits(df["cli_test__llm4es_embedding__vector"][i], vecs[i]) for i in range(len(USERS)))
    assert df["cli_test__agg_features__n_events"].notna().all()
