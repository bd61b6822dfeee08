"""The cross-channel bank through the product, as a user runs it: synth-clicks --app-users, the session and
intent producers (lexical labeller, no LLM), publish, then app visits joined to web features in Feast at the
visit's time, and `evaluate-crosschannel`. The point-in-time check: a web session that ends after an app
visit is never a feature of that visit."""
from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd

from producers.stores.warehouse import Home
from training.evaluate.crosschannel import fetch_web_features, labeller_shares, load_app_side
from tests.cli.test_sessions_cli import DATASET, TAXONOMY, ok


def test_web_sessions_reach_app_visits_point_in_time(llm4es, tmp_path):
    source = tmp_path / "cc"
    out = ok(llm4es("synth-clicks", source, "--visitors", 100, "--seed", 4, "--app-users", 0.7, "--link-share", 0.6))
    assert "app visits" in out
    ok(llm4es("ingest", DATASET, "--source", source))
    ok(llm4es("validate", DATASET, "--no-data-docs"))
    ok(llm4es("sessions", "build", DATASET))
    tiny = ["--epochs", 1, "--d-model", 16, "--layers", 1, "--batch-size", 32]
    ok(llm4es("sessions", "train", DATASET, *tiny))
    ok(llm4es("sessions", "embed", DATASET, *tiny))
    taxonomy = tmp_path / "taxonomy.txt"
    taxonomy.write_text(TAXONOMY)
    ok(llm4es("intents", "build", DATASET, "--from-file", taxonomy))
    ok(llm4es("intents", "label", DATASET, "--llm-backend", "lexical", "--sample-size", 0))
    ok(llm4es("intents", "distill", DATASET, "--llm-backend", "lexical", "--llm-latency-sessions", 4))
    ok(llm4es("publish", DATASET))

    home = Home.resolve(tmp_path / "home")
    visits, _ = load_app_side(source)
    links = pd.read_csv(source / "links.csv", dtype={"user_id": "Int64"})
    links["session_end"] = pd.to_datetime(links["session_end"], utc=True)
    linked = links[links["user_id"].notna()].sort_values("session_end")
    # Probe visits a second before and at the end of linked sessions, plus the real visits.
    probe = linked.head(40)
    extra = pd.DataFrame({"user_id": np.r_[probe["user_id"], probe["user_id"]].astype(int),
                          "ts": pd.concat([probe["session_end"] - timedelta(seconds=1), probe["session_end"]],
                                          ignore_index=True)})
    frame = pd.concat([visits[["user_id", "ts"]], extra], ignore_index=True)
    web = fetch_web_features(home, DATASET, frame)
    con = home.connect(read_only=True)
    try:
        emb = dict(con.execute("SELECT session_id, embedding FROM bank_clickstream.session_embeddings").fetchall())
    finally:
        con.close()
    by_user = {u: g for u, g in linked.groupby("user_id")}
    seen = 0
    for i, (user, t) in enumerate(zip(frame["user_id"], frame["ts"])):
        mine = by_user.get(user)
        before = mine[mine["session_end"] <= t] if mine is not None else None
        if before is None or before.empty:
            assert web["last_session_embedding"][i] is None  # no linked session had ended: no web feature
            continue
        seen += 1
        # Exactly the linked sessions that ended by then: later ones (and anonymous ones) never count.
        assert web["sessions_so_far"][i] == len(before), (user, t)
        last = before.sort_values(["session_end", "session_id"]).iloc[-1]["session_id"]
        assert np.allclose(web["last_session_embedding"][i], np.asarray(emb[last], np.float32))
    assert seen > 30
    # The probe a second before a session's end never sees that session; the one at its end does.
    n = len(visits)
    for k in range(len(probe)):
        before_end, at_end = n + k, n + len(probe) + k
        earlier = web["sessions_so_far"][before_end]
        assert web["sessions_so_far"][at_end] == (0 if pd.isna(earlier) else earlier) + 1

    # The labeller's shares (not a Feast view) follow the same rule: none before the first linked session ends.
    shares, _ = labeller_shares(home, "bank_clickstream", frame, 10)
    has = web["sessions_so_far"].fillna(0).to_numpy() > 0
    total = shares.sum(axis=1).to_numpy()
    assert shares.shape[1] >= 4 and np.allclose(total[~has], 0)
    assert (np.abs(total[has] - 1) < 1e-9).mean() > 0.95  # a few sessions the labeller left unlabelled

    out = ok(llm4es("evaluate-crosschannel", DATASET, "--source", source, "--folds", 2))
    assert "Tile ranking" in out and "macro Recall@1" in out and "micro F1" in out
    report = json.loads((home.reports_dir("crosschannel", "bank_clickstream") / "crosschannel.json").read_text())
    assert set(report["ranking"]) == {"app only", "+ session embedding", "+ distilled intents", "+ both"}
    assert set(report["conversion"]) == {"app only", "session embedding", "labeller intents", "distilled intents"}
    assert report["latency"]["classifier_seconds_per_session"] > 0
    assert 0 < report["visits_with_web_history"] < 1


def test_an_app_side_from_another_folder_than_the_ingested_web_side_is_refused(llm4es, tmp_path):
    """App users and web visitors share ids only within one generation. The README's session commands ingest the
    default set (no --source); an `evaluate-crosschannel --source DIR` then joined DIR's app users to unrelated
    visitors and reported +26% Recall@1 instead of +12%, without a word."""
    from tests.cli.conftest import assert_clean_exit_1

    web, cc = tmp_path / "web", tmp_path / "cc"
    ok(llm4es("synth-clicks", web, "--visitors", 60, "--seed", 4))
    ok(llm4es("synth-clicks", cc, "--visitors", 60, "--seed", 4, "--app-users", 0.7))
    ok(llm4es("ingest", DATASET, "--source", web))
    refused = llm4es("evaluate-crosschannel", DATASET, "--source", cc)
    assert_clean_exit_1(refused)
    text = " ".join(refused.output.split())
    assert f"was not ingested from {cc / 'clicks.csv'}" in text and f"--source {cc}" in text
    ok(llm4es("ingest", DATASET, "--source", cc))
    later = llm4es("evaluate-crosschannel", DATASET, "--source", cc)  # goes on to its own requirements
    assert "was not ingested from" not in later.output
