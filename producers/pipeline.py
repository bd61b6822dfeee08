"""The facade the CLI drives: one method per command, typed arguments, no printing.

Each method resolves names (built-in dataset or mapping file, default source or --source),
calls the stage's library function and returns its result; the CLI prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from producers.aggregate import AggregateConfig
from producers.ingest.default_sources import fetch_default_source
from producers.datasets.definition import (
    DatasetDefinition,
    DefinitionError,
    load_builtin,
    load_mapping,
)
from producers.ingest import IngestConfig
from producers.stores.cache import default_cache_dir
from producers.stores.warehouse import Home
from validation.run import ValidateConfig

if TYPE_CHECKING:  # the stages' configs; their modules load when a method runs
    from producers.coles import ColesConfig
    from producers.enrich.run import EnrichConfig
    from producers.intents import DistillConfig, LabelConfig, TaxonomyConfig
    from producers.publish import PublishConfig
    from producers.sessions import SessionEncoderConfig, SessionsConfig
    from training.embed import EmbedConfig
    from training.evaluate import EvaluateConfig
    from training.finetune import FinetuneConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class Pipeline:
    home: Home
    cache_dir: Path
    log: Log = lambda _: None

    @classmethod
    def create(cls, home: str | Path | None = None, cache_dir: str | Path | None = None,
               log: Log = lambda _: None) -> "Pipeline":
        return cls(Home.resolve(home), Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), log)

    def definition(self, dataset: str, mapping: Path | None = None) -> DatasetDefinition:
        """A built-in dataset by name, or the one a mapping file describes (its name must match)."""
        if mapping is None:
            return load_builtin(dataset)
        definition = load_mapping(mapping)
        if dataset != definition.name:
            raise DefinitionError(f"{mapping}: describes dataset {definition.name!r}, not {dataset!r}")
        return definition

    def ingest(self, dataset: str, source: Path | None = None, mapping: Path | None = None,
               max_reject_share: float = IngestConfig.max_reject_share, force: bool = IngestConfig.force,
               max_line_size: int | None = IngestConfig.max_line_size, allow_shrink: bool = IngestConfig.allow_shrink):
        from producers.ingest import ingest
        from producers.ingest.source_files import SourceError

        definition = self.definition(dataset, mapping)
        if source is None and mapping is not None:
            source = mapping.parent  # a mapping's files usually sit beside it
        if source is None:
            self.log(f"{dataset}: no --source given, using the default copy in {self.cache_dir}")
            source = fetch_default_source(dataset, self.cache_dir)
            if source is None:
                raise SourceError(f"{dataset} has no default source: pass --source with the folder or zip of its files")
        config = IngestConfig(Path(source), max_reject_share, force, max_line_size=max_line_size,
                              allow_shrink=allow_shrink)
        return ingest(self.home, definition, config, self.log)

    def append(self, dataset: str, source: Path, mapping: Path | None = None,
               max_reject_share: float = IngestConfig.max_reject_share,
               max_line_size: int | None = IngestConfig.max_line_size):
        from producers.datasets.definition import builtin_names
        from producers.ingest.append import append
        from producers.stores.warehouse import stored_definition

        config = IngestConfig(Path(source), max_reject_share, max_line_size=max_line_size)
        if mapping is None and dataset not in builtin_names():
            con = self.home.connect(read_only=True)  # your own data: the mapping it was ingested with
            try:
                definition = stored_definition(con, dataset)
            finally:
                con.close()
        else:
            definition = self.definition(dataset, mapping)
        return append(self.home, definition, config, self.log)

    def validate(self, dataset: str, max_reject_share: float = ValidateConfig.max_reject_share,
                 chunk_rows: int = ValidateConfig.chunk_rows, data_docs: bool = ValidateConfig.data_docs,
                 delta: bool = False):
        from validation.run import validate

        return validate(self.home, dataset, ValidateConfig(chunk_rows, max_reject_share, data_docs, delta), self.log)

    def serialize(self, dataset: str, model: str, max_tokens: int, time_format: str, force: bool = False,
                  fmt: str = "paper"):
        from producers.serialize.run import SerializeConfig, serialize

        config = SerializeConfig(model=model, max_tokens=max_tokens, time_format=time_format, format=fmt, force=force)
        return serialize(self.home, dataset, config, self.log)

    def aggregate(self, dataset: str, top_n: int = AggregateConfig.top_n,
                  as_of: datetime | None = AggregateConfig.as_of,
                  amount_field: str | None = AggregateConfig.amount_field, force: bool = AggregateConfig.force):
        from producers.aggregate import aggregate

        config = AggregateConfig(top_n=top_n, as_of=as_of, amount_field=amount_field, force=force)
        return aggregate(self.home, dataset, config, self.log)

    def enrich(self, dataset: str, config: EnrichConfig):
        from producers.enrich.run import enrich

        return enrich(self.home, dataset, config, self.log)

    def finetune(self, dataset: str, config: FinetuneConfig):
        from training.finetune import finetune

        return finetune(self.home, dataset, config, self.log)

    def embed(self, dataset: str, config: EmbedConfig):
        from training.embed import embed

        return embed(self.home, dataset, config, self.log)

    def coles(self, dataset: str, config: ColesConfig):
        from producers.coles import coles

        return coles(self.home, dataset, config, self.log)

    def sessions_build(self, dataset: str, config: SessionsConfig):
        from producers.sessions import build_sessions

        return build_sessions(self.home, dataset, config, self.log)

    def sessions_train(self, dataset: str, config: SessionEncoderConfig):
        from producers.sessions import train_encoder

        return train_encoder(self.home, dataset, config, self.log)

    def sessions_embed(self, dataset: str, config: SessionEncoderConfig):
        from producers.sessions import embed_sessions

        return embed_sessions(self.home, dataset, config, self.log)

    def intents_build(self, dataset: str, config: TaxonomyConfig):
        from producers.intents import build_taxonomy

        return build_taxonomy(self.home, dataset, config, self.log)

    def intents_import(self, dataset: str, path: Path, max_labels: int = 50):
        from producers.intents import import_taxonomy

        return import_taxonomy(self.home, dataset, path, max_labels, self.log)

    def intents_label(self, dataset: str, config: LabelConfig):
        from producers.intents import label_sessions

        return label_sessions(self.home, dataset, config, self.log)

    def intents_distill(self, dataset: str, config: DistillConfig):
        from producers.intents import distill_intents

        return distill_intents(self.home, dataset, config, self.log)

    def publish(self, dataset: str, config: PublishConfig):
        from producers.publish import publish

        return publish(self.home, dataset, config, self.log)

    def refresh(self, dataset: str, config):
        from producers.refresh import refresh

        return refresh(self.home, dataset, config, self.log)

    def materialize(self, online_store: str = "sqlite"):
        from producers.publish import materialize

        return materialize(self.home, online_store=online_store, log=self.log)

    def online_features(self, dataset: str, views: list[str], user_ids: list, online_store: str = "sqlite"):
        from producers.publish import online_features

        return online_features(self.home, dataset, views, user_ids, online_store=online_store)

    def first_user(self, dataset: str):
        """The smallest user id with events (a user every feature view holds)."""
        from producers.stores.warehouse import stored_definition

        con = self.home.connect(read_only=True)
        try:
            schema = stored_definition(con, dataset).schema
            return con.execute(f'SELECT min(user_id) FROM "{schema}".events').fetchall()[0][0]
        finally:
            con.close()

    def evaluate(self, dataset: str, config: EvaluateConfig):
        from training.evaluate import evaluate

        return evaluate(self.home, dataset, config, self.log)

    def fetch(self, model: str | None = None) -> dict[str, Path]:
        """Put the default dataset and model in the cache (idempotent, fast when already there)."""
        from producers.shared.models import DEFAULT_MODEL, resolve_model

        fetched = {"movielens-100k": fetch_default_source("movielens-100k", self.cache_dir)}
        name = model or DEFAULT_MODEL
        fetched[name] = Path(resolve_model(name, cache_dir=self.cache_dir, progress=self.log))
        return fetched
