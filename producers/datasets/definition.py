"""What a dataset is: its raw files, how they become typed events and users, and field metadata.

One definition format serves every dataset. The built-in datasets are YAML files in
`builtin/`, and a user's own data is described by the same YAML (the "generic" adapter), so
ingestion, validation and serialization never need code per dataset. The format is documented
in the README ("Describing your own data").

Expressions (`sql:`) are DuckDB SQL over the raw columns, which are all read as VARCHAR and
qualified by their table name (`movies.movie_title`). A field's value is
`TRY_CAST(<column or sql> AS <dtype>)`; a row whose raw value is present but does not parse is
rejected with a reason instead of being loaded.

A mapping is untrusted text (users share them): `file:` must be a relative path inside the
source folder, and `sql:` one expression (`expressions.check_expression`), both checked here,
when the definition is parsed.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from producers.datasets.expressions import check_expression
from producers.errors import Llm4esError

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DTYPES = {"VARCHAR", "BIGINT", "INTEGER", "DOUBLE", "BOOLEAN", "DATE", "TIMESTAMP"}
NUMERIC_DTYPES = {"BIGINT", "INTEGER", "DOUBLE"}
WINDOW_NOW_SLACK = timedelta(days=1)  # "now" in a time window: clocks and time zones differ by up to a day


class DefinitionError(Llm4esError, ValueError):
    """The dataset definition (mapping file) is malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableSource(_Strict):
    """One raw input file. `file` may list alternatives: the first one found in the source is used."""

    file: str | list[str]
    delimiter: str | None = None  # CSV only; DuckDB sniffs it when absent
    header: bool = True
    columns: list[str] | None = None  # names to give the columns (required when header is false)
    encoding: Literal["utf-8", "utf-16", "latin-1"] = "utf-8"
    quote: str | None = '"'

    @field_validator("file")
    @classmethod
    def _inside_source(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            check_relative_file(name)
        return v

    @property
    def candidates(self) -> list[str]:
        return [self.file] if isinstance(self.file, str) else list(self.file)


def check_relative_file(name: str) -> None:
    """A `file:` names a file under the source folder: no absolute path, no `..`, no drive."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name.strip():
        raise ValueError("is empty")
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("~"):
        raise ValueError(f"{name!r} is an absolute path; a mapping may only name files under the --source folder")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"{name!r} leaves the source folder (`..`); a mapping may only name files under --source")


def _one_expression(v: str | None) -> str | None:
    if v is not None:
        if not v.strip():
            raise ValueError("is empty")
        check_expression(v)
    return v


class TimeSpec(_Strict):
    """How the event time is read.

    format: a strptime pattern (`%Y-%m-%d %H:%M:%S`), `auto` (any ISO-like timestamp), `unix`
    (seconds), `unix_ms`, `day_index` (integer days since `origin`) or `day_index_time`
    (`"<days> HH:MM:SS"` since `origin`, as in the Sber gender dataset).
    """

    column: str | None = None
    sql: str | None = None
    format: str = "auto"
    origin: str | None = None  # a date: day 0 of day-index formats
    label: str = "Date"  # the time's name in serialized text
    display: str = "%Y-%m-%d %H:%M"  # how serialized text shows the time (strftime)
    # A plausible window: events outside it fail validation (not ingestion). Each bound is an ISO
    # date or time, or "now": the time validation runs plus WINDOW_NOW_SLACK (so a future-dated
    # event, which would become every user's as-of time, is caught by default).
    window: tuple[str, str] = ("1970-01-01", "now")

    _sql_is_one_expression = field_validator("sql")(_one_expression)

    @model_validator(mode="after")
    def _check(self) -> "TimeSpec":
        if (self.column is None) == (self.sql is None):
            raise ValueError("give exactly one of `column` or `sql`")
        if self.format.startswith("day_index") and not self.origin:
            raise ValueError(f"format {self.format!r} needs an `origin` date (day 0)")
        for bound in self.window:
            if bound != "now":
                try:
                    datetime.fromisoformat(bound)
                except ValueError:
                    raise ValueError(f"window bound {bound!r} must be an ISO date (2024-01-31), a time "
                                     "(2024-01-31T12:00:00) or \"now\"") from None
        return self

    def window_bounds(self, now: datetime | None = None) -> tuple[datetime, datetime]:
        """The window as times, "now" resolved to `now` (default: the current UTC time) plus WINDOW_NOW_SLACK."""
        now = now or datetime.now(timezone.utc).replace(tzinfo=None)
        start, end = (now + WINDOW_NOW_SLACK if b == "now" else datetime.fromisoformat(b) for b in self.window)
        return start, end


class FieldSpec(_Strict):
    """One typed column of the events (or users) table."""

    name: str  # column name in the warehouse
    label: str | None = None  # human-readable name (serialization header); defaults to name
    kind: Literal["categorical", "numeric", "text"] = "text"
    column: str | None = None  # raw column (qualified or not)
    sql: str | None = None  # or an expression over raw columns
    dtype: str = "VARCHAR"
    codes: str | None = None  # name of a code table giving each value's text description
    values: list[str | int | float | bool] | None = None  # allowed values (validation)
    min: float | None = None
    max: float | None = None
    serialize: bool = True  # part of the user's text (false for ids that repeat another field)
    decimals: int = 2  # DOUBLE values are shown with this many decimals
    # How a raw `column` writes numbers: `decimal: ","` reads 12,50 (European exports), `thousands` the
    # group separator to drop (1.234,56 with thousands "."); values that do not follow them are rejected.
    decimal: Literal[".", ","] = "."
    thousands: Literal["", ".", ",", " ", "'"] = ""

    _sql_is_one_expression = field_validator("sql")(_one_expression)

    @model_validator(mode="after")
    def _check(self) -> "FieldSpec":
        if not IDENTIFIER.match(self.name):
            raise ValueError(f"name {self.name!r} must be a plain identifier (letters, digits, _)")
        if self.name.startswith("__"):
            raise ValueError(f"name {self.name!r}: names starting with __ are reserved for llm4es")
        if self.column is None and self.sql is None:
            raise ValueError("give `column` or `sql`")
        if self.dtype.upper() not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} must be one of {sorted(DTYPES)}")
        if self.decimal != "." or self.thousands:
            if self.dtype.upper() not in NUMERIC_DTYPES:
                raise ValueError(f"decimal/thousands read numbers: dtype {self.dtype!r} must be one of "
                                 f"{sorted(NUMERIC_DTYPES)}")
            if self.column is None or self.sql is not None:
                raise ValueError("decimal/thousands read a raw `column` (an `sql` expression reads its own way)")
            if self.thousands == self.decimal:
                raise ValueError(f"thousands {self.thousands!r} cannot also be the decimal separator")
        return self

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def is_number(self) -> bool:
        """A numeric field stored as a number (a numeric field of another dtype, e.g. a DATE, is not)."""
        return self.kind == "numeric" and self.dtype.upper() in NUMERIC_DTYPES


class LabelSpec(FieldSpec):
    """A user-level target. binary/multiclass labels are categorical, regression numeric."""

    task: Literal["binary", "multiclass", "regression"] = "binary"
    kind: Literal["categorical", "numeric", "text"] = "categorical"


class Lookup(_Strict):
    """A table joined to the events by key (e.g. movie attributes by movie id)."""

    table: str
    join: dict[str, str]  # events raw column -> lookup table column (not `on`: YAML reads it as true)


class SummarySpec(_Strict):
    """How a prose summary groups a history: per category of `group_by`, a count and `measures`.

    `split` breaks a multi-valued text (MovieLens genres "Action, Comedy") into categories.
    """

    group_by: str
    split: str | None = None
    measures: list[str] = Field(default_factory=list)
    stat: Literal["sum", "mean"] = "sum"
    unit: str = ""  # appended to measures in prose ("rubles")


class SessionSpec(_Strict):
    """How a user's events are cut into sessions (the session-embedding and intent producers).

    `column`: an events field holding an explicit session id (web analytics usually has one);
    otherwise a new session starts wherever the user was inactive for more than `gap_minutes`
    (30 minutes suits web clicks, a day suits MovieLens rating bursts).
    """

    column: str | None = None
    gap_minutes: float = Field(default=30.0, gt=0)


class EventsSpec(_Strict):
    table: str
    user: str  # raw user column
    user_dtype: Literal["VARCHAR", "BIGINT"] = "VARCHAR"
    time: TimeSpec
    fields: list[FieldSpec]
    lookups: list[Lookup] = Field(default_factory=list)
    key: list[str] | None = None  # warehouse columns that identify an event uniquely
    min_events_per_user: int = 1
    summary: SummarySpec | None = None
    sessions: SessionSpec = Field(default_factory=SessionSpec)


class UsersSpec(_Strict):
    table: str
    user: str
    labels: list[LabelSpec] = Field(default_factory=list)
    attributes: list[FieldSpec] = Field(default_factory=list)
    # True where the users file lists every user (MovieLens); label files of the bank datasets
    # cover only the training users, so their events may have users the file lacks.
    covers_all_events: bool = False


class CodeSource(_Strict):
    """Where a code table's descriptions come from: a raw table, inline values, or iso18245."""

    table: str | None = None
    code: str | None = None
    description: str | None = None
    values: dict[str, str] | None = None
    iso18245: bool = False  # MCC descriptions from the iso18245 package

    @field_validator("values", mode="before")
    @classmethod
    def _codes_as_text(cls, v):
        # YAML reads `810: Russian ruble` with an integer key; codes are compared as text.
        return {str(k): str(val) for k, val in v.items()} if isinstance(v, dict) else v


class CodeTable(_Strict):
    # Sources in priority order: the first that knows a code gives its description.
    sources: list[CodeSource]
    # Codes are compared as text; `pad` left-pads them with zeros (MCC 742 -> "0742").
    pad: int | None = None


class DatasetDefinition(_Strict):
    name: str
    description: str = ""
    event_noun: str = "events"  # what one event is, in prompts and prose ("card transactions")
    tables: dict[str, TableSource]
    events: EventsSpec
    users: UsersSpec | None = None
    codes: dict[str, CodeTable] = Field(default_factory=dict)
    # Where the definition was read from, for error messages (not part of the fingerprint).
    _origin: str = PrivateAttr(default="")

    @property
    def origin(self) -> str:
        return self._origin or f"the definition of {self.name}"

    def sql_expressions(self) -> list[tuple[str, str, str]]:
        """(path in the mapping, table, expression) of every `sql:` entry, in mapping order."""
        found = []
        ev = self.events
        if ev.time.sql:
            found.append(("events.time.sql", ev.table, ev.time.sql))
        found += [(f"events.fields.{i}.sql", ev.table, f.sql) for i, f in enumerate(ev.fields) if f.sql]
        if self.users:
            for group in ("labels", "attributes"):
                found += [(f"users.{group}.{i}.sql", self.users.table, f.sql)
                          for i, f in enumerate(getattr(self.users, group)) if f.sql]
        return found

    @model_validator(mode="after")
    def _check_references(self) -> "DatasetDefinition":
        tables = set(self.tables)
        refs = [self.events.table, *(lk.table for lk in self.events.lookups)]
        if self.users:
            refs.append(self.users.table)
        refs += [s.table for ct in self.codes.values() for s in ct.sources if s.table]
        for ref in refs:
            if ref not in tables:
                raise ValueError(f"table {ref!r} is used but not declared under `tables`")
        names = [f.name for f in self.events.fields]
        dupes = {n for n in names if names.count(n) > 1} | ({"user_id", "event_time"} & set(names))
        if dupes:
            raise ValueError(f"events.fields: duplicate or reserved names {sorted(dupes)}")
        for f in self.all_fields:
            if f.codes and f.codes not in self.codes:
                raise ValueError(f"field {f.name!r} uses code table {f.codes!r}, not declared under `codes`")
        summary = self.events.summary
        if summary:
            for name in [summary.group_by, *summary.measures]:
                if name not in names:
                    raise ValueError(f"events.summary: {name!r} is not an events field")
        session_column = self.events.sessions.column
        if session_column and session_column not in names:
            raise ValueError(f"events.sessions.column: {session_column!r} is not an events field")
        for col in self.events.key or []:
            if col not in {"user_id", "event_time", *names}:
                raise ValueError(f"events.key: {col!r} is not an events column")
        return self

    @property
    def schema(self) -> str:
        """The warehouse schema: the dataset name as an identifier."""
        return schema_name(self.name)

    @property
    def serialized_fields(self) -> list[FieldSpec]:
        return [f for f in self.events.fields if f.serialize]

    @property
    def all_fields(self) -> list[FieldSpec]:
        users = [*self.users.labels, *self.users.attributes] if self.users else []
        return [*self.events.fields, *users]

    def fingerprint(self) -> str:
        """A stable hash of the definition: recorded with everything produced from it (CoLES keys its runs
        by it). Options added later are left out at their defaults, so an upgrade keeps every earlier key."""
        blob = json.dumps(_without_late_defaults(self.model_dump(mode="json")), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


LATE_FIELD_DEFAULTS = {"decimal": ".", "thousands": ""}  # FieldSpec options added on 2026-11-28


def _without_late_defaults(dumped: Any) -> Any:
    """`dumped` (a definition's JSON form) without the LATE_FIELD_DEFAULTS of its field specs."""
    if isinstance(dumped, list):
        return [_without_late_defaults(x) for x in dumped]
    if not isinstance(dumped, dict):
        return dumped
    is_field = "dtype" in dumped and "kind" in dumped
    return {k: _without_late_defaults(v) for k, v in dumped.items()
            if not (is_field and k in LATE_FIELD_DEFAULTS and v == LATE_FIELD_DEFAULTS[k])}


def schema_name(dataset: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", dataset).lower()
    return name if IDENTIFIER.match(name) else f"d_{name}"


def builtin_names() -> list[str]:
    files = resources.files("producers.datasets").joinpath("builtin").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_builtin(name: str) -> DatasetDefinition:
    path = resources.files("producers.datasets").joinpath("builtin", f"{name}.yaml")
    if not path.is_file():
        raise DefinitionError(
            f"unknown dataset {name!r}: built-in datasets are {', '.join(builtin_names())}; "
            "describe your own with --mapping FILE.yaml"
        )
    return parse_definition(path.read_text(), origin=f"built-in {name}.yaml")


def load_mapping(path: Path) -> DatasetDefinition:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DefinitionError(f"{path}: cannot read the mapping file ({e.strerror})") from e
    return parse_definition(text, origin=str(path))


def parse_definition(text: str, origin: str) -> DatasetDefinition:
    """Parse YAML into a definition; errors name the file and the path of the bad entry."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DefinitionError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DefinitionError(f"{origin}: expected a mapping at the top level")
    try:
        definition = DatasetDefinition.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        raise DefinitionError(f"{origin}: invalid dataset definition\n" + "\n".join(lines)) from None
    definition._origin = origin
    return definition
