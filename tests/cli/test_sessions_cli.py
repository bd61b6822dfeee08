"""The session and intent commands end to end on a small synthetic clickstream, as a user runs them:
generate, ingest, validate, sessions build/train/embed, a reviewed taxonomy, labels, distillation,
publish, and the four views read back online. The labeller is the word-overlap one (no LLM)."""
from __future__ import annotations


from producers.publish import online_features, published_views
from producers.synthetic.agreement import planted_agreement, read_planted
from producers.stores.warehouse import Home
from tests.cli.conftest import assert_clean_exit_1

TAXONOMY = """home_loans: mortgages, mortgage rates, refinancing
credit_cards: credit cards, rewards, cash back, card applications
saving_and_investing: savings accounts, CD rates, retirement, investing
borrowing: personal loans, auto loans
managing_accounts: sign in, balances, statements, transfers, payments
getting_help: help, lost card, fraud, password reset, contact
"""
DATASET, SCHEMA = "bank-clickstream", "bank_clickstream"


def ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_sessions_and_intents_from_clicks_to_online_features(llm4es, tmp_path):
    clicks = tmp_path / "clicks"
    ok(llm4es("synth-clicks", clicks, "--visitors", 120, "--seed", 3))
    ok(llm4es("ingest", DATASET, "--source", clicks))
    assert_clean_exit_1(llm4es("sessions", "build", DATASET))  # not validated yet: the gate refuses
    ok(llm4es("validate", DATASET, "--no-data-docs"))
    out = ok(llm4es("sessions", "build", DATASET))
    assert "by column session_id" in out and "checks passed" in out
    assert_clean_exit_1(llm4es("sessions", "embed", DATASET, "--epochs", 2, "--d-model", 16))  # nothing trained
    tiny = ["--epochs", 2, "--d-model", 16, "--layers", 1, "--batch-size", 32]
    out = ok(llm4es("sessions", "train", DATASET, *tiny))
    assert "2 epoch(s) trained" in out
    assert "a finished run reused" in ok(llm4es("sessions", "train", DATASET, *tiny))
    assert "vectors of size 16" in ok(llm4es("sessions", "embed", DATASET, *tiny))

    taxonomy = tmp_path / "taxonomy.txt"
    taxonomy.write_text(TAXONOMY)
    assert "taxonomy v1, 6 labels" in ok(llm4es("intents", "build", DATASET, "--from-file", taxonomy))
    out = ok(llm4es("intents", "label", DATASET, "--llm-backend", "lexical", "--sample-size", 0))
    assert "tfidf-overlap" in out
    out = ok(llm4es("intents", "distill", DATASET, "--llm-backend", "lexical", "--llm-latency-sessions", 4))
    assert "macro F1" in out and "latency per session" in out

    home = Home.resolve(tmp_path / "home")
    con = home.connect(read_only=True)
    try:
        agreement = planted_agreement(con, SCHEMA, read_planted(clicks / "planted_intents.csv"))
    finally:
        con.close()
    # Word overlap with a sensible taxonomy recovers the planted intents far above always-the-majority.
    assert agreement.llm["accuracy"] > agreement.llm["chance"] + 0.3
    assert agreement.distilled["accuracy"] > agreement.distilled["chance"] + 0.3
    assert not agreement.unmapped_planted

    out = ok(llm4es("publish", DATASET, "--materialize", "--recent-sessions", 3))
    assert "session_embedding_rollup" in out and "intent_shares" in out
    views = {v.name: v for v in published_views(home, DATASET)}
    assert {f"{SCHEMA}__session_embedding", f"{SCHEMA}__session_intent"} <= set(views)
    session = con_first_session(home)
    online = online_features(home, DATASET, ["session_embedding", "session_intent"], [session])
    assert len(online[f"{SCHEMA}__session_embedding__embedding"][0]) == 16
    assert online[f"{SCHEMA}__session_intent__intent"][0] in TAXONOMY
    user = online[f"{SCHEMA}__session_intent__user_id"][0]
    rollup = online_features(home, DATASET, ["session_embedding_rollup", "intent_shares"], [user])
    shares = [c for c in rollup.columns if "__share__" in c]
    assert len(shares) == 6 and abs(sum(rollup[c][0] for c in shares) - 1) < 1e-6


def con_first_session(home: Home) -> str:
    con = home.connect(read_only=True)
    try:
        return con.execute(f"SELECT min(session_id) FROM {SCHEMA}.sessions").fetchall()[0][0]
    finally:
        con.close()


def test_distill_warns_of_the_labels_too_few_sessions_carry(llm4es, tmp_path):
    """A label with fewer than 2 LLM-labelled sessions is left out of the fit, so the classifier never gives it to
    any session; the summary said nothing of it (a small --sample-size, or a weak LLM, made it easy to miss)."""
    clicks = tmp_path / "clicks"
    ok(llm4es("synth-clicks", clicks, "--visitors", 40, "--seed", 3))
    ok(llm4es("ingest", DATASET, "--source", clicks))
    ok(llm4es("validate", DATASET, "--no-data-docs"))
    ok(llm4es("sessions", "build", DATASET))
    tiny = ["--epochs", 1, "--d-model", 16, "--layers", 1, "--batch-size", 32]
    assert "batch/s" not in ok(llm4es("sessions", "train", DATASET, *tiny))  # no progress bars off a terminal
    ok(llm4es("sessions", "embed", DATASET, *tiny))
    taxonomy = tmp_path / "taxonomy.txt"
    taxonomy.write_text(TAXONOMY)
    ok(llm4es("intents", "build", DATASET, "--from-file", taxonomy))
    ok(llm4es("intents", "label", DATASET, "--llm-backend", "lexical", "--sample-size", 10))
    out = ok(llm4es("intents", "distill", DATASET, "--llm-backend", "lexical", "--llm-latency-sessions", 0))
    home = Home.resolve(tmp_path / "home")
    con = home.connect(read_only=True)
    try:
        given = {lb for (lb,) in con.execute(f"SELECT DISTINCT label FROM {SCHEMA}.session_intents").fetchall()}
    finally:
        con.close()
    never = [line.split(":", 1)[0].strip() for line in TAXONOMY.splitlines() if line.split(":", 1)[0] not in given]
    assert never, "the sample should leave a label without 2 examples"
    assert f"never predicts {', '.join(never)} (fewer than 2 sessions" in out
