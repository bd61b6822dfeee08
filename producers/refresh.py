"""`llm4es refresh DATASET`: recompute only the users with new events, gate the snapshot, publish it.

What a refresh does, in order (under a per-dataset lock):

1. Reads what is served (the publish manifest): the last published as-of of the user views and the
   served LLM4ES set (model, checkpoint, layers, text kind, and the settings its file recorded).
2. Finds the changed users: events after that as-of (`changed_users`) or appended since the last
   publish whatever their times (`appended_users`, late events). None: does nothing and says so.
3. Refuses another model or checkpoint than the served one (vectors of two models in one view would
   be silently wrong) unless `full`: then every user is re-embedded with the new one.
4. Recomputes only the changed users with the stages' own code and the served settings: texts
   (`serialize` with the stored texts' config), LLM4ES vectors (`embed` with the served set's model,
   checkpoint, layers, pooling and lengths), aggregates (`aggregate` with the served top values, so
   the columns do not move), CoLES vectors by inference with the served encoder (no training; values
   coded with the vocabulary it was trained on). The text, LLM4ES and aggregate stages replace these
   users' rows in their tables and keep the others'; CoLES writes only the snapshot.
   A few unchanged users (`canary_users`) are embedded again beside them: the gate's check that
   unchanged users keep their vectors needs them.
5. Writes the snapshot: the changed users' rows only (feature_timestamp = the new as-of), under
   `data/<schema>/refresh/<as-of>/`, with `refresh.json` (users, model, checkpoint, gate reports).
6. Runs the snapshot gate (`validation.snapshot_gate`) on each vector set against the previous
   snapshot (the latest published row of every user). A failing snapshot is not published
   (SnapshotGateError, with the report) unless `force`.
7. Publishes the snapshot files through the publish flow (histories gain rows at the new as-of;
   an unchanged user's latest row stays its older one) and materializes incrementally.

Sessions (`_refresh_sessions`, when session embeddings or intents are served): the changed users'
sessions are cut again (`sessions build` restricted to them, with the stored cutting rule); the sessions
of theirs that end at or after their first new event (a session still open at the served as-of that
gained events, and new ones; late events included) are embedded with the served session encoder (its
checkpoint, vocabulary and config: no training) and labelled by the served distilled classifier (the one
`intents distill` saved: no LLM, no re-fitting); every other session keeps its stored vector and label.
Their rows are replaced in place in `session_embeddings` and `session_intents` (one transaction each, the
changed users' rows only; `producers.stores.outputs.change_in_place`), and every current session of the
changed users goes to the snapshot (`session_embeddings.parquet`, `session_intents.parquet` under
`data/<schema>/refresh/<as-of>/`), the files publish is given. The stage Parquet copies are not
rewritten: the tables are the truth, and a copy a refresh left behind is written again from its table
before a full publish reads it (`export_if_behind`). Publish, given the refreshed users, computes the
session views and user rollups of those users only and keeps every other user's published rows
(`producers.publish.snapshots._stage_sessions`). The session vectors are gated like the user vectors,
keyed by session (the changed sessions, a few unchanged ones embedded again as canaries and a fixed
hash sample of the rest, read from the table and the served history). A session
encoder or classifier other than the served one (re-trained and stored since the last publish) is
refused unless `full`, which cuts, embeds and labels every session with the stored ones.

Not refreshed (said in the result, never skipped silently): LLM4ES sets of enriched texts, intents
distilled before `intents distill` saved its classifier, and CoLES with `full` (re-train it with
`llm4es coles`). Their views keep their older rows.

A refresh killed at any point leaves the previous snapshot served: nothing is published before step 7,
whose own safety is publish's. Its one warehouse connection (`Home.hold`) rolls back an unfinished
transaction and closes when it raises; a process killed outright leaves DuckDB's write-ahead log, which
the next open replays (committed writes only). The next refresh finds the same users (the served as-of did not move)
and completes; the stages' tables already hold their new rows, which are recomputed identically.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from producers.errors import Llm4esError
from producers.stores.warehouse import Home, sql_ident, sql_str, stored_definition
from producers.stores.locks import file_lock
from producers.stores.outputs import read_output, read_provenance, write_parquet

Log = Callable[[str], None]

REFRESHED = ("agg", "llm4es", "coles", "sessions", "intents")  # the kinds a refresh recomputes
NOT_REFRESHED: dict[str, str] = {}  # served kinds a refresh cannot recompute, and why


class RefreshError(Llm4esError, ValueError):
    """A refresh that cannot be done as asked (nothing published yet, another model than the served one...)."""


@dataclass(frozen=True)
class RefreshConfig:
    model: str | None = None  # None: the served LLM4ES set's model
    checkpoint: str | None = None  # None: the served set's checkpoint ("base" for the model without fine-tuning)
    full: bool = False  # recompute every user (after re-training: a new model or checkpoint)
    force: bool = False  # publish a snapshot that fails its gate
    online_store: str = "sqlite"
    redis_url: str | None = None
    materialize: bool = True  # materialize-incremental after publishing
    canary_users: int = 8  # unchanged users embedded again for the gate's "unchanged users keep their vectors"
    min_drift_users: int = 100  # fewer users: the PSI drift checks are reported but not enforced (too noisy)
    # a refresh of some users gates their changed sessions, the canaries and this many other served sessions
    # (a fixed hash sample, the same ids old and new): enough for the PSI bins (10 bins, ~500 rows each)
    # while the gate's cost no longer grows with every session ever cut
    gate_sample_sessions: int = 5000


@dataclass
class RefreshResult:
    dataset: str
    since: datetime | None  # the served as-of
    as_of: datetime | None  # the new one
    users: list = field(default_factory=list)  # recomputed (changed, or everyone with `full`)
    nothing_new: bool = False
    refreshed: list[str] = field(default_factory=list)  # kinds
    not_refreshed: list[str] = field(default_factory=list)  # served kinds left at their older rows, and why
    model: str | None = None
    checkpoint: str | None = None
    gate: dict[str, str] = field(default_factory=dict)  # kind -> the gate's report
    gate_passed: bool = True
    published: bool = False
    snapshot_dir: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    publish_result: object | None = None


def _reached(phase: str) -> None:
    """A named point of a refresh: `computed` (stages done, nothing published), `gated` (gate passed, not
    published). Does nothing; the tests replace it to kill a refresh at a known phase."""


def refresh(home: Home, dataset: str, config: RefreshConfig = RefreshConfig(), log: Log = lambda _: None,
            tokenizer=None) -> RefreshResult:
    from producers.datasets.definition import schema_name

    schema = schema_name(dataset)
    # one warehouse connection for every stage (`Home.hold`): each opening its own cost ~10-20 ms to open
    # and a checkpoint to close, which outweighed the work of the cheap stages on a few users
    with file_lock(home.data_dir / schema / ".refresh.lock"), home.hold():
        return _refresh(home, dataset, schema, config, log, tokenizer)


def _refresh(home: Home, dataset: str, schema: str, config: RefreshConfig, log: Log, tokenizer) -> RefreshResult:
    from producers.ingest.delta import appended_users, changed_users
    from producers.stores.serving import _read_manifest, manifest_path

    entry = _read_manifest(manifest_path(home)).get("datasets", {}).get(dataset)
    if not entry:
        raise RefreshError(f"{dataset} has not been published: run the stages and `llm4es publish {dataset}` once; "
                           "refresh then keeps it fresh")
    sets, defaults = entry.get("sets", {}), entry.get("defaults", {})
    served = {k: sets[defaults[k]] for k in (*REFRESHED, *NOT_REFRESHED) if defaults.get(k) in sets}
    if not any(k in served for k in REFRESHED):
        raise RefreshError(f"{dataset}: none of {', '.join(REFRESHED)} is published; refresh recomputes those")
    since = min(datetime.fromisoformat(max(served[k]["feature_timestamps"])) for k in REFRESHED if k in served)
    result = RefreshResult(dataset, since, None)
    result.not_refreshed = [NOT_REFRESHED[k] for k in NOT_REFRESHED if k in served]
    llm = served.get("llm4es")
    want_model, want_ck = _wanted_model(home, llm, config)
    result.model, result.checkpoint = want_model, want_ck
    if llm is not None and not config.full and (want_model, want_ck) != (llm["model"], llm["checkpoint"]):
        raise RefreshError(
            f"{dataset} serves LLM4ES vectors of {llm['model']} at checkpoint {llm['checkpoint']}; refreshing some "
            f"users with {want_model} at {want_ck} would put vectors of two models in one view. Pass --full to "
            "re-embed every user with it")
    if llm is not None and not config.full:
        from training.embed import POOLING, pooling_description

        prov = read_provenance(llm["file"], missing_ok=True)
        pooling, spec = prov.get("pooling") or llm.get("pooling"), prov.get("pooling_spec")
        # a set made before `embed --pooling` existed records only the description, of the mean pooling
        reproducible = pooling_description(spec) if spec else POOLING
        if pooling and pooling != reproducible:
            raise RefreshError(f"the served LLM4ES set was pooled as {pooling!r}, this code pools as "
                               f"{reproducible!r}; pass --full to re-embed every user")

    session_models = _session_models(home, dataset, schema, served, config)

    con = home.connect(read_only=True)
    try:
        as_of = con.execute(f"SELECT max(event_time) FROM {sql_ident(schema)}.events").fetchall()[0][0]
        stored_definition(con, dataset)
    finally:
        con.close()
    result.as_of = as_of
    if config.full:
        users = None
    else:
        users = sorted(set(changed_users(home, schema, since)) |
                       set(appended_users(home, schema, datetime.fromisoformat(entry["published_at"]))))
        if not users:
            result.nothing_new = True
            log(f"{dataset}: no events after the served as-of {since} and nothing appended since the last publish "
                f"({entry['published_at']}): nothing to refresh")
            return result
    result.users = users if users is not None else []
    log(f"{dataset}: {'every user' if users is None else f'{len(users):,} users'} with events after {since}; "
        f"recomputing as of {as_of}")
    for what in result.not_refreshed:
        log(f"not refreshed: {what}; its served rows stay the older ones")

    snap = home.data_dir / schema / "refresh" / as_of.strftime("%Y%m%dT%H%M%S")
    inputs: dict[str, list[Path]] = {}
    gate_inputs: dict[str, tuple] = {}
    if llm is not None:
        if llm["text_kind"] != "serialized":
            result.not_refreshed.append(f"LLM4ES embeddings of {llm['text_kind']!r} texts (enrichment is not "
                                        "refreshed)")
        else:
            canary = [] if users is None else _canary(home, llm, set(users), config.canary_users)
            _timed(result, "serialize", lambda: _serialize(home, dataset, users, tokenizer, log))
            full_file = _timed(result, "embed", lambda: _embed(home, dataset, llm, users, canary, config,
                                                               want_model, want_ck, log))
            inputs["llm4es"] = [_snapshot_file(full_file, snap / "embeddings" / full_file.name, users, as_of)]
            same = (llm["model"], llm["checkpoint"]) == (want_model, want_ck)  # else another space
            gate_inputs["llm4es"] = (_rows_of(full_file, users, canary), users, canary, llm if same else None)
            result.refreshed.append("llm4es")
    if "coles" in served:
        if config.full:
            result.not_refreshed.append("CoLES (--full does not re-train it: run `llm4es coles` and publish)")
        else:
            canary = _canary(home, served["coles"], set(users), config.canary_users)
            table, users_file = _timed(result, "coles", lambda: _coles(home, dataset, served["coles"], users, canary,
                                                                       as_of, snap, log))
            inputs["coles"] = [users_file]
            gate_inputs["coles"] = (table, users, canary, served["coles"])
            result.refreshed.append("coles")
    if "agg" in served:
        inputs["agg"] = [_timed(result, "aggregate", lambda: _aggregate(home, dataset, served["agg"], users, as_of,
                                                                        snap, log))]
        result.refreshed.append("agg")
    if session_models:
        _refresh_sessions(home, dataset, schema, entry, served, users, since, session_models, config, result,
                          inputs, log, snap)
    result.snapshot_dir = snap
    _reached("computed")

    started = time.perf_counter()
    for kind, (table, who, canary, previous) in gate_inputs.items():
        report = _gate(home, kind, table, who, canary, previous, config, log)
        result.gate[kind] = report.message()
        result.gate_passed &= report.success
    if "agg" in inputs:
        report = _gate_aggregates(home, served["agg"], inputs["agg"][0], users, config, log)
        result.gate["agg"] = report.message()
        result.gate_passed &= report.success
    result.seconds["gate"] = time.perf_counter() - started
    _write_report(snap, result)
    if not result.gate_passed and not config.force:
        from validation.snapshot_gate import SnapshotGateError

        raise SnapshotGateError(_Failed("\n".join(f"{k}: {m}" for k, m in result.gate.items()),
                                        f" (report: {snap / 'refresh.json'})"))
    _reached("gated")

    from producers.publish import PublishConfig, publish

    # the refreshed LLM4ES set is the only one given, so it is (or stays) the default one
    # the refreshed users' session rollups over as many recent sessions as the served ones
    windows = [served[k]["recent_sessions"] for k in ("sessions", "intents")
               if served.get(k, {}).get("recent_sessions")]
    recent = {"recent_sessions": windows[0]} if windows else {}
    result.publish_result = _timed(result, "publish", lambda: publish(home, dataset, PublishConfig(
        online_store=config.online_store, redis_url=config.redis_url, materialize=config.materialize, **recent),
        log, inputs=inputs, users=users))
    result.published = True
    _write_report(snap, result)
    return result


class _Failed:
    """What SnapshotGateError wants of a report: its message (several sets' reports, joined)."""

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where

    def message(self) -> str:
        return self.text + self.where


def _timed(result: RefreshResult, stage: str, run: Callable):
    started = time.perf_counter()
    try:
        return run()
    finally:
        result.seconds[stage] = time.perf_counter() - started


def _wanted_model(home: Home, llm: dict | None, config: RefreshConfig) -> tuple[str | None, str | None]:
    if llm is None:
        return config.model, config.checkpoint
    model = config.model or llm["model"]
    if config.checkpoint is None:
        return model, (llm["checkpoint"] if config.model is None else "base")
    if config.checkpoint == "base":
        return model, "base"
    from training.embed import find_checkpoints

    found = find_checkpoints(home, config.checkpoint)
    if len(found) != 1:
        raise RefreshError(f"checkpoint {config.checkpoint} holds {len(found)} models; name one epoch folder")
    return str(found[0].info.get("model_source") or model), found[0].label


def _canary(home: Home, llm: dict, changed: set, n: int) -> list:
    """The first `n` users of the served set (by id) whose events did not change."""
    import pyarrow.parquet as pq

    if n <= 0:
        return []
    ids = sorted(set(pq.read_table(llm["file"], columns=["user_id"]).column("user_id").to_pylist()) - changed)
    return ids[:n]


def _serialize(home: Home, dataset: str, users: list | None, tokenizer, log: Log) -> None:
    """The users' texts again, with the config the stored texts were made with."""
    from producers.serialize.run import SerializeConfig, serialize

    con = home.connect(read_only=True)
    try:
        schema = stored_definition(con, dataset).schema
        row = con.execute(f"SELECT config FROM {sql_ident(schema)}.texts WHERE kind = 'serialized' "
                          "ORDER BY produced_at DESC LIMIT 1").fetchone()
    finally:
        con.close()
    if row is None:
        raise RefreshError(f"{dataset} has no serialized texts: run `llm4es serialize {dataset}` first")
    stored = json.loads(row[0])
    names = {f.name for f in fields(SerializeConfig)}
    config = SerializeConfig(**{k: v for k, v in stored.items() if k in names and k not in ("users", "force")},
                             users=tuple(users) if users is not None else None)
    serialize(home, dataset, config, log, tokenizer=tokenizer)


def _embed(home: Home, dataset: str, llm: dict, users: list | None, canary: list, config: RefreshConfig,
           model: str, checkpoint: str, log: Log) -> Path:
    """The users' vectors with the served set's settings (or, with `full`, everyone's with the wanted model)."""
    from training.embed import EmbedConfig, embed

    prov = read_provenance(llm["file"], missing_ok=True)
    keep = {k: prov[k] for k in ("variant", "max_length", "truncation_side", "add_special_tokens",
                                 "attn_implementation", "quantize") if k in prov}
    if prov.get("dtype") in ("float32", "bfloat16", "float16"):
        keep["dtype"] = prov["dtype"]
    if prov.get("pooling_spec"):
        keep["pooling"] = prov["pooling_spec"]
    embed_config = EmbedConfig(model=model, checkpoint=None if checkpoint == "base" else checkpoint,
                               kind=llm["text_kind"], layers=llm["layers"], device="auto",
                               users=None if users is None else tuple(sorted(set(users) | set(canary))), **keep)
    result = embed(home, dataset, embed_config, log)
    return Path(result.sets[-1].parquet)


def _aggregate(home: Home, dataset: str, agg: dict, users: list | None, as_of: datetime, snap: Path,
               log: Log) -> Path:
    """The snapshot file of the users' aggregates as of `as_of`, with the served top values (the served
    columns). A refresh of some users reads only their events and writes only their rows."""
    import pyarrow.parquet as pq

    from producers.aggregate import AggregateConfig, aggregate

    prov = read_provenance(agg["file"], missing_ok=True)
    cfg = prov.get("config") or {}
    common = dict(top_n=cfg.get("top_n", 20), max_text_values=cfg.get("max_text_values", 50),
                  amount_field=cfg.get("amount_field"), as_of=as_of)
    if users is None:
        full = aggregate(home, dataset, AggregateConfig(**common), log).parquet_path
        return _snapshot_file(full, snap / full.name, None, as_of)
    if "categories" not in prov:
        raise RefreshError(f"{agg['file']} does not record its top values: run `llm4es aggregate {dataset}` "
                           "and publish once before refreshing")
    file = aggregate(home, dataset, AggregateConfig(**common, users=tuple(users), categories=prov["categories"]),
                     log).parquet_path
    if file.parent != snap:  # the snapshot folder is the one place both name (data/<schema>/refresh/<as-of>)
        raise RefreshError(f"aggregate wrote the refreshed rows to {file}, not into the snapshot folder {snap}")
    n = pq.ParquetFile(file).metadata.num_rows
    if n != len(users):
        raise RefreshError(f"{file}: {len(users) - n:,} refreshed users have no aggregate row at {as_of}")
    return file


def _coles(home: Home, dataset: str, info: dict, users: list, canary: list, as_of: datetime, snap: Path,
           log: Log):
    """The users' CoLES vectors by inference with the served encoder (no training): their events up to
    `as_of`, coded with the vocabulary the encoder was trained on. Returns (the users' and canaries'
    vectors for the gate, the users' snapshot file)."""
    import pyarrow as pa

    from producers.coles import train as T
    from producers.coles.config import recorded_config
    from producers.coles.records import read_records
    from producers.shared.devices import pick_device
    from producers.stores.provenance import code_version
    from producers.stores.warehouse import float32_lists

    prov = read_provenance(info["file"])
    config = recorded_config(prov.get("config") or {}, as_of)
    checkpoint = home.root / prov["checkpoint"]
    if not checkpoint.is_file():
        raise RefreshError(f"the served CoLES encoder {checkpoint} is gone: run `llm4es coles {dataset}` and publish "
                           "before refreshing")
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        stored = prov.get("vocabulary") or {}
        codes = ({name: v["values"] for name, v in stored.items()}
                 if stored and all("values" in v for v in stored.values()) else None)
        records = read_records(con, d, config, vocab_as_of=datetime.fromisoformat(prov["data"]["as_of"]),
                               users=sorted(set(users) | set(canary)), codes=codes)
    finally:
        con.close()
    module = T.build_module(records, config)
    T.load_weights(module, checkpoint)
    from producers.coles.config import ColesError

    vectors = T.infer(module.seq_encoder, records, pick_device(config.device, ColesError), pooling=config.pooling)
    log(f"CoLES: {len(records.users):,} users inferred with {prov['checkpoint']} (no training)")
    everyone = pa.table({"user_id": pa.array(records.users), "vector": float32_lists(vectors)})
    wanted = set(users)
    mine = [i for i, u in enumerate(records.users) if u in wanted]
    n = len(mine)
    rows = pa.table({
        "user_id": pa.array([records.users[i] for i in mine]), "vector": float32_lists(vectors[mine]),
        "dim": pa.array([int(vectors.shape[1])] * n, pa.int32()), "model": pa.array([prov["model"]] * n),
        "checkpoint": pa.array([prov["checkpoint"]] * n), "epoch": pa.array([prov.get("epoch")] * n, pa.int32()),
        "feature_timestamp": pa.array([as_of] * n, pa.timestamp("us")),
        "produced_at": pa.array([datetime.now(timezone.utc).replace(tzinfo=None)] * n, pa.timestamp("us")),
        "source_hash": pa.array([info.get("source_hash")] * n, pa.string()),
        "code_version": pa.array([code_version()] * n, pa.string())})
    path = write_parquet(rows, snap / "coles_embeddings.parquet",
                         {**prov, "feature_timestamp": as_of.isoformat(), "refresh": {
                             "as_of": as_of.isoformat(), "n_users": n, "inference_only": True}})
    return everyone, path


def _snapshot_file(source: Path, target: Path, users: list | None, as_of: datetime) -> Path:
    """The rows of `source` at `as_of` of these users (all: `users` None), with its provenance, to `target`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, prov = read_output(source)
    ts = pc.cast(table.column("feature_timestamp"), pa.timestamp("us"))
    keep = pc.equal(ts, pa.scalar(as_of, pa.timestamp("us")))
    if users is not None:
        keep = pc.and_(keep, pc.is_in(table.column("user_id"), value_set=pa.array(users, table.column("user_id").type)))
    rows = table.filter(keep)
    if users is not None and rows.num_rows != len(users):
        got = set(rows.column("user_id").to_pylist())
        missing = [u for u in users if u not in got][:5]
        raise RefreshError(f"{source}: {len(users) - rows.num_rows:,} refreshed users have no row at {as_of} "
                           f"(e.g. {missing})")
    return write_parquet(rows, target, {**prov, "refresh": {"as_of": as_of.isoformat(), "n_users": rows.num_rows}})


def _rows_of(path: Path, users: list | None, canary: list):
    """user_id and vector of these users and the canaries (everyone: `users` None) in an output file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["user_id", "vector"])
    if users is None:
        return table
    who = sorted(set(users) | set(canary))
    return table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(who, table.column("user_id").type)))


def _gate(home: Home, kind: str, table, users: list | None, canary: list, previous: dict | None,
          config: RefreshConfig, log: Log):
    """The snapshot gate on the refreshed users' vectors (plus the canaries), against each user's latest served row."""
    from producers.stores.serving import feast_dir

    who = None if users is None else sorted(set(users) | set(canary))
    old = None
    if previous is not None:
        history = feast_dir(home) / previous["source"]
        if history.is_file():
            import duckdb

            con = duckdb.connect()
            try:
                old = con.sql(f"SELECT user_id, vector FROM read_parquet({sql_str(str(history))}) "
                              "QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY feature_timestamp DESC) = 1"
                              ).to_arrow_table()
            finally:
                con.close()
    if old is not None and who is not None:
        # The served population as it will be: the previous rows, the refreshed users' (and canaries') replaced.
        # Drift and norms are judged on it: the changed users alone are no random sample of the population.
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pc.invert(pc.is_in(old.column("user_id"), value_set=pa.array(who, old.column("user_id").type)))
        table = pa.concat_tables([old.filter(keep).select(["user_id", "vector"]),
                                  table.select(["user_id", "vector"]).cast(old.select(["user_id", "vector"]).schema)])
    return _check(table, old, canary, config, log, kind, "users")


def _gate_aggregates(home: Home, served: dict, snapshot: Path, users: list | None, config: RefreshConfig, log: Log):
    """The aggregate snapshot gate: served columns, no NaN/inf, every refreshed user, values in the served ranges."""
    from producers.stores.serving import feast_dir
    from validation.aggregate_gate import check_aggregate_file
    from validation.snapshot_gate import SnapshotGateError

    # a refresh of some users keeps the served columns; a full one picks the top values afresh (its own columns)
    own = read_provenance(snapshot)["columns"]
    columns = (read_provenance(served["file"], missing_ok=True).get("columns") or own) if users is not None else own
    try:
        report = check_aggregate_file(snapshot, columns, feast_dir(home) / served["source"], expected_users=users,
                                      force=config.force)
    except SnapshotGateError as e:
        report = e.report
    log(f"gate (agg): {report.message()}")
    return report


def _write_report(snap: Path, result: RefreshResult) -> None:
    from producers.stores.outputs import atomic_write_text

    snap.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(result).items() if k not in ("publish_result", "users")}
    data["n_users"] = len(result.users)
    data["users_sample"] = result.users[:20]
    atomic_write_text(snap / "refresh.json", json.dumps(data, indent=2, default=str) + "\n")


# ---- sessions, session embeddings and intents ----


def _session_models(home: Home, dataset: str, schema: str, served: dict, config: RefreshConfig) -> dict:
    """The session encoder checkpoint and intent classifier a refresh uses: those the stage tables hold
    (`sessions embed`, `intents distill`). Another than the served one is refused unless `full`. Intents
    distilled before the classifier was saved map to None (not refreshed)."""
    from producers.stores.outputs import SESSION_EMBEDDINGS, SESSION_INTENTS, current_provenance

    models: dict = {}
    for kind, output, key, what in (("sessions", SESSION_EMBEDDINGS, "checkpoint", "session encoder"),
                                    ("intents", SESSION_INTENTS, "classifier_sha256", "intent classifier")):
        if kind not in served:
            continue
        path = output.parquet_path(home, schema)
        con = home.connect(read_only=True)
        try:  # the table's provenance: a refresh changes it in place and leaves its Parquet copy behind
            prov = current_provenance(con, home, output, schema)
        finally:
            con.close()
        if not prov:
            raise RefreshError(f"{dataset} serves {output.description} but {path} is gone: run `{output.produced_by} "
                               f"{dataset}` and publish before refreshing")
        have, want = prov.get(key), served[kind].get(key)
        if kind == "intents" and (have is None or want is None):
            models[kind] = None
            continue
        if have != want and not config.full:
            raise RefreshError(
                f"{dataset} serves {output.description} of the {what} {want}, but {path.name} now holds those of "
                f"{have} (produced after the last publish); refreshing some sessions with it would put two "
                f"{what}s' outputs in one view. Publish it (`llm4es publish {dataset}`) or pass --full to redo every "
                "session with it")
        models[kind] = have
    return models


def _refresh_sessions(home: Home, dataset: str, schema: str, entry: dict, served: dict, users: list | None,
                      since: datetime, models: dict, config: RefreshConfig, result: RefreshResult,
                      inputs: dict, log: Log, snap: Path) -> None:
    """Cut the users' sessions again, embed and label their new or changed ones, gate the session vectors;
    add the session files to `inputs` (see the module docstring)."""
    from producers.ingest.delta import first_new_events
    from producers.intents.classify import classify_sessions
    from producers.sessions import SessionsConfig, build_sessions
    from producers.sessions.build import changed_sessions
    from producers.sessions.embed import embed_some

    if users is None:  # every session, cut by the rule they were cut by (a --gap-minutes of the last build)
        con = home.connect(read_only=True)
        try:
            spec = json.loads(con.execute(f"SELECT spec FROM {sql_ident(schema)}.sessions_meta").fetchone()[0])
        finally:
            con.close()
        sessions_config = SessionsConfig(gap_minutes=None if spec.get("column") else spec.get("gap_minutes"))
    else:
        sessions_config = SessionsConfig(users=tuple(users))
    _timed(result, "sessions", lambda: build_sessions(home, dataset, sessions_config, log))
    todo = None
    if users is not None:
        firsts = first_new_events(home, schema, since, datetime.fromisoformat(entry["published_at"]))
        wanted = set(users)
        todo = changed_sessions(home, dataset, {u: t for u, t in firsts.items() if u in wanted})
        log(f"{len(todo):,} new or changed sessions of {len(users):,} users (those ending at or after each user's "
            "first new event)")
    from producers.stores.outputs import SESSION_EMBEDDINGS, SESSION_INTENTS

    # a refresh of some users changes the tables in place and writes those users' sessions to its own files
    own = {k: None if users is None else snap / o.file for k, o in (("sessions", SESSION_EMBEDDINGS),
                                                                     ("intents", SESSION_INTENTS))}
    if "sessions" in models:
        same = models["sessions"] == served["sessions"].get("checkpoint")
        history = _served_sessions(home, entry) if same else None
        canary = [] if todo is None or history is None else _session_canary(history, users, todo,
                                                                             config.canary_users)
        r = _timed(result, "session_embed", lambda: embed_some(home, dataset, home.root / models["sessions"], todo,
                                                               log, also=canary, users=users,
                                                               snapshot=own["sessions"]))
        started = time.perf_counter()
        report = _gate_sessions(home, schema, r.parquet_path, r.unstored, history, canary, config, log, todo, users)
        result.seconds["session_gate"] = time.perf_counter() - started
        result.gate["sessions"] = report.message()
        result.gate_passed &= report.success
        inputs["sessions"] = [r.parquet_path]
        result.refreshed.append("sessions")
    if "intents" in served:
        if "sessions" not in models:
            result.not_refreshed.append("session intents (their session embeddings are not served: publish them)")
        elif models.get("intents") is None:
            result.not_refreshed.append("session intents (distilled before `intents distill` saved its classifier: "
                                        "run it again and publish)")
        else:
            inputs["intents"] = [_timed(result, "intents", lambda: classify_sessions(
                home, dataset, todo, models["intents"], log, users=users, snapshot=own["intents"]))]
            result.refreshed.append("intents")


def _served_sessions(home: Home, entry: dict) -> Path | None:
    """The history file of the served session view (None when it has none)."""
    from producers.stores.serving import feast_dir

    info = entry.get("sets", {}).get("session_embedding")
    path = feast_dir(home) / info["source"] if info else None
    return path if path is not None and path.is_file() else None


def _session_canary(history: Path, changed: list, todo: list, n: int) -> list:
    """The first `n` served sessions (by id) of users whose events did not change."""
    if n <= 0:
        return []
    import duckdb

    con = duckdb.connect()
    try:
        return [r[0] for r in con.execute(
            f"SELECT session_id FROM read_parquet({sql_str(str(history))}) "
            "WHERE user_id NOT IN (SELECT unnest($users)) AND session_id NOT IN (SELECT unnest($todo)) "
            "ORDER BY session_id LIMIT $n",
            {"users": list(changed), "todo": list(todo), "n": n}).fetchall()]
    finally:
        con.close()


def _gate_sample(con, relation: str, todo: list, canary: list, n: int) -> list:
    """`todo`, `canary` and the `n` other session ids of `relation` (SQL) of smallest md5: deterministic, and
    unbiased as to user or time; DuckDB picks them (the ids are not read into Python)."""
    keep = sorted(set(todo) | set(canary))
    rest = con.execute(f"SELECT session_id FROM {relation} WHERE session_id NOT IN (SELECT unnest($keep)) "
                       "ORDER BY md5(session_id), session_id LIMIT $n", {"keep": keep, "n": n}).fetchall()
    return keep + [r[0] for r in rest]


def _gate_sessions(home: Home, schema: str, own: Path, canary_vectors, history: Path | None, canary: list,
                   config: RefreshConfig, log: Log, todo: list | None = None, users: list | None = None):
    """The snapshot gate on the session vectors as they will be served (the canaries' recomputed vectors in
    place of their stored ones), keyed by session, against the served ones (None: another encoder).

    As they will be served: the refresh's own file (`own`: every session of the refreshed `users`; every
    session when `users` is None) and the other users' served sessions (from the history; from the table
    when there is none). With `todo` (a refresh of some users): only the changed sessions, the canaries and
    a fixed hash sample of `config.gate_sample_sessions` other sessions, on both sides; every session
    otherwise. Nothing reads every stored vector: DuckDB reads the sample's rows of the files."""
    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc

    from producers.stores.outputs import SESSION_EMBEDDINGS

    con = duckdb.connect() if history is not None or users is None else home.connect(read_only=True)
    try:
        old_src = None if history is None else f"read_parquet({sql_str(str(history))})"
        others = old_src or f"{sql_ident(schema)}.{SESSION_EMBEDDINGS.table}"
        served_others = ""
        if users is not None:
            con.execute("CREATE OR REPLACE TEMP TABLE refreshed AS SELECT unnest($users) AS user_id", {"users": users})
            served_others = (f"SELECT CAST(session_id AS VARCHAR) AS session_id, embedding FROM {others} "
                             "WHERE user_id NOT IN (SELECT user_id FROM refreshed) UNION ALL ")
        mine = f"read_parquet({sql_str(str(own))})"
        con.execute(f"CREATE OR REPLACE TEMP VIEW will AS {served_others}"
                    f"SELECT CAST(session_id AS VARCHAR) AS session_id, embedding FROM {mine}")
        where = ""
        n_will = con.execute("SELECT count(*) FROM will").fetchall()[0][0]
        if todo is not None and n_will > len(todo) + len(canary) + config.gate_sample_sessions:
            ids = _gate_sample(con, "will", todo, canary, config.gate_sample_sessions)
            con.execute("CREATE OR REPLACE TEMP TABLE picked AS SELECT unnest($ids) AS session_id", {"ids": ids})
            where = "WHERE session_id IN (SELECT session_id FROM picked)"
            log(f"gate (sessions): {len(ids):,} sessions judged ({len(todo):,} changed, {len(canary)} canaries, "
                "a hash sample of the rest)")
        table = con.sql(f"SELECT session_id, embedding FROM will {where} ORDER BY session_id").to_arrow_table()
        old = None if old_src is None else con.sql(
            f"SELECT CAST(session_id AS VARCHAR) AS session_id, embedding FROM {old_src} {where} ORDER BY session_id"
        ).to_arrow_table()
    finally:
        con.close()
    if canary:
        keep = pc.invert(pc.is_in(table.column("session_id"), value_set=pa.array(canary, pa.string())))
        table = pa.concat_tables([table.filter(keep), canary_vectors.cast(table.schema)])
    return _check(table, old, canary, config, log, "sessions", "sessions", user_column="session_id",
                  vector_column="embedding")


def _check(table, old, canary: list, config: RefreshConfig, log: Log, kind: str, rows: str, **columns):
    """The snapshot gate on `table` against `old`; drift is reported, not enforced, on too few rows to judge it."""
    from validation.snapshot_gate import SnapshotGateConfig, SnapshotGateError, check_snapshot

    gate_config = SnapshotGateConfig()
    if table.num_rows < config.min_drift_users:
        log(f"gate ({kind}): {table.num_rows} {rows}, fewer than {config.min_drift_users}: the PSI drift figures are "
            "reported, not enforced")
        gate_config = SnapshotGateConfig(max_psi=float("inf"))
    try:
        report = check_snapshot(table, old, gate_config, force=config.force, noun=rows,
                                unchanged_users=canary if canary and old is not None else None, **columns)
    except SnapshotGateError as e:
        report = e.report
    log(f"gate ({kind}): {report.message()}")
    return report
