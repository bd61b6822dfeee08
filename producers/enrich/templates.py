"""The `template` enricher: each user's history rewritten in seven formats, without a model.

The paper (section 2, "Text Enrichment"; Table 9) has an LLM rewrite the serialized history into
varied formats: JSON, Markdown, HTML, YAML, XML, plain text, with category names and field
names paraphrased. This enricher does the same with templates, so the 7x mixed-format data can
be made in seconds and is exactly faithful to the events:

- variant v of a user is written in one of `FORMATS`; variants 0..6 of one user cover all seven
  (a per-user permutation), later variants reuse the formats with other paraphrases and layouts;
- field names are paraphrased from `synonyms.yaml` (Date -> When, Amount -> Sum...), category
  values too where a table knows them (Sci-Fi -> Science fiction, "Grocery Stores,
  Supermarkets" -> Supermarkets), one choice per text so a text is consistent with itself;
- dates, times and numbers are written exactly as serialization rendered them (JSON and YAML
  hold numbers as numbers of the same value);
- the structured formats are built by their libraries (json, yaml, xml.etree's escaping rules,
  csv, html.escape) and always parse; `prose` is the paper's Table 2: counts and totals per
  category, then the events.

Everything is drawn from a `random.Random` seeded by sha256 of (seed, user, variant), so a
rewrite depends on nothing else (not on the other users, the order, or Python's hash seed).
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable
from xml.etree import ElementTree as ET

import yaml

from producers.datasets.definition import DatasetDefinition
from producers.enrich.base import Rewrite, UserHistory

FORMATS = ("json", "markdown", "html", "yaml", "xml", "csv", "prose")
TOP_CATEGORIES = 10  # categories listed in a summary

_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_NON_WORD = re.compile(r"\W+")
# Characters XML 1.0 cannot hold even escaped (controls other than tab and line breaks).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


# --- synonyms ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Synonyms:
    """Paraphrase tables: field labels, per-domain labels, category values (see synonyms.yaml)."""

    labels: dict[str, tuple[str, ...]]
    domains: dict[str, dict[str, tuple[str, ...]]]
    values: dict[str, dict[str, tuple[str, ...]]]
    mcc_networks: bool = False  # MCC descriptions also paraphrased by other card networks' wording

    @classmethod
    def parse(cls, raw: dict) -> "Synonyms":
        def table(d: dict | None) -> dict[str, tuple[str, ...]]:
            return {str(k).casefold(): tuple(str(x) for x in v) for k, v in (d or {}).items() if v}

        return cls(labels=table(raw.get("labels")),
                   domains={str(k).casefold(): table(v) for k, v in (raw.get("domains") or {}).items()},
                   values={str(k).casefold(): table(v) for k, v in (raw.get("values") or {}).items()},
                   mcc_networks=bool(raw.get("mcc_networks", False)))

    def label_options(self, label: str, event_noun: str = "") -> list[str]:
        """The label itself first, then its paraphrases (general, then the dataset's domain)."""
        key, noun = label.casefold(), event_noun.casefold()
        alternatives = list(self.labels.get(key, ()))
        for word, table in self.domains.items():
            if word in noun:
                alternatives += table.get(key, ())
        return _distinct([label, *alternatives])

    def value_table(self, *scopes: str) -> dict[str, tuple[str, ...]]:
        """value (casefolded) -> paraphrases, from the "*" table and those of `scopes` (field names)."""
        merged: dict[str, tuple[str, ...]] = dict(self.values.get("*", {}))
        for scope in scopes:
            for value, alternatives in self.values.get(scope.casefold(), {}).items():
                merged[value] = _distinct_tuple(merged.get(value, ()) + alternatives)
        return merged


@lru_cache(maxsize=1)
def default_synonyms() -> Synonyms:
    text = resources.files("producers.enrich").joinpath("synonyms.yaml").read_text(encoding="utf-8")
    return Synonyms.parse(yaml.safe_load(text) or {})


@lru_cache(maxsize=1)
def mcc_alternatives() -> dict[str, tuple[str, ...]]:
    """MCC description (casefolded) -> the other card networks' descriptions of the same code.

    From the iso18245 package the warehouse takes its MCC descriptions from: Mastercard's
    "Grocery Stores, Supermarkets" is Visa's "Grocery Stores and Supermarkets" and ISO's
    "Groceries and supermarkets". Empty when the package is missing.
    """
    try:
        data = resources.files("iso18245").joinpath("data")
        by_code: dict[str, list[str]] = {}
        for name in ("mastercard_list", "visa_list", "iso18245_official_list"):
            with data.joinpath(f"{name}.csv").open(encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    description = (row.get("DESCRIPTION") or "").strip()
                    if description and row.get("MCC"):
                        by_code.setdefault(row["MCC"].strip(), []).append(description)
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for descriptions in by_code.values():
        names = _distinct(descriptions)
        for name in names:
            others = tuple(n for n in names if n is not name)
            if others:
                out[name.casefold()] = _distinct_tuple(out.get(name.casefold(), ()) + others)
    return out


def _distinct(items) -> list[str]:
    seen, out = set(), []
    for item in items:
        key = item.casefold()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _distinct_tuple(items) -> tuple[str, ...]:
    return tuple(_distinct(items))


# --- what a history's columns are --------------------------------------------------------

@dataclass(frozen=True)
class _Column:
    name: str
    label: str
    label_options: tuple[str, ...]
    kind: str  # "time", "int", "float" (numbers kept as numbers in JSON/YAML) or "text"
    decimals: int
    values: dict[str, tuple[str, ...]] | None  # paraphrases of its values (None: never paraphrased)
    split: str | None  # multi-valued: paraphrased part by part


@dataclass(frozen=True)
class _Plan:
    columns: tuple[_Column, ...]
    noun: str
    group: int | None  # the column the summary groups by
    split: str | None
    measures: tuple[int, ...]
    stat: str  # "sum" or "mean"
    unit: str


def _plan(d: DatasetDefinition, columns: list[str], labels: list[str], synonyms: Synonyms) -> _Plan:
    fields = {f.name: f for f in d.events.fields}
    summary = d.events.summary
    noun = d.event_noun or "events"
    iso_codes = {name for name, table in d.codes.items() if any(s.iso18245 for s in table.sources)}
    cols = []
    for name, label in zip(columns, labels):
        f = fields.get(name)
        options = tuple(synonyms.label_options(label, noun))
        if name == "time":  # the event time: rendered by the definition's `display`, never changed
            cols.append(_Column(name, label, options, "time", 0, None, None))
            continue
        dtype = f.dtype.upper() if f else "VARCHAR"
        coded = bool(f and f.codes)
        if not coded and dtype in ("INTEGER", "BIGINT"):
            cols.append(_Column(name, label, options, "int", 0, None, None))
        elif not coded and dtype == "DOUBLE":
            cols.append(_Column(name, label, options, "float", f.decimals, None, None))
        elif dtype in ("DATE", "TIMESTAMP", "BOOLEAN"):
            cols.append(_Column(name, label, options, "text", 0, None, None))
        else:
            # Category values only (a movie title is left alone), and the summary's group field.
            grouped = bool(summary and summary.group_by == name)
            values = None
            if f is not None and (f.kind == "categorical" or grouped):
                values = synonyms.value_table(name, label)
                if f.codes in iso_codes and synonyms.mcc_networks:
                    iso = mcc_alternatives()
                    values = {**iso, **{k: _distinct_tuple(v + iso.get(k, ())) for k, v in values.items()}}
            split = summary.split if grouped else None
            cols.append(_Column(name, label, options, "text", 0, values or None, split))
    index = {c.name: i for i, c in enumerate(cols)}
    if summary is not None and summary.group_by in index:
        group = index[summary.group_by]
        measures = tuple(index[m] for m in summary.measures if m in index)
        split, stat, unit = summary.split, summary.stat, summary.unit
    else:
        categorical = [f.name for f in d.serialized_fields if f.kind == "categorical" and f.name in index]
        group = index[categorical[0]] if categorical else None
        measures, split, stat, unit = (), None, "sum", ""
    return _Plan(tuple(cols), noun, group, split, measures, stat, unit)


# --- the enricher ------------------------------------------------------------------------

class TemplateEnricher:
    name = "template"

    def __init__(self, seed: int = 0, synonyms: Synonyms | None = None):
        self.seed = seed
        self.synonyms = synonyms or default_synonyms()

    def format_for(self, user_id, variant: int) -> str:
        """The format of a user's variant: a per-user permutation of the seven, cycled."""
        order = list(FORMATS)
        _rng(f"{self.seed}:{user_id}:formats").shuffle(order)
        return order[variant % len(order)]

    def rewrite(self, definition: DatasetDefinition, histories: list[UserHistory], variant: int) -> list[Rewrite]:
        plans: dict[tuple, _Plan] = {}
        out = []
        for h in histories:
            key = (tuple(h.columns), tuple(h.labels))
            if key not in plans:
                plans[key] = _plan(definition, h.columns, h.labels, self.synonyms)
            out.append(self._rewrite(plans[key], h, variant, None))
        return out

    def rewrite_one(self, definition: DatasetDefinition, history: UserHistory, variant: int,
                    fmt: str | None = None) -> Rewrite:
        """One history in a given format (default: the variant's), e.g. an LLM output's fallback."""
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
        return self._rewrite(_plan(definition, history.columns, history.labels, self.synonyms), history, variant, fmt)

    def _rewrite(self, plan: _Plan, h: UserHistory, variant: int, fmt: str | None) -> Rewrite:
        fmt = fmt or self.format_for(h.user_id, variant)
        rng = _rng(f"{self.seed}:{h.user_id}:{variant}")
        text = _WRITERS[fmt](_Text(plan, h.rows, rng))
        return Rewrite(text=text, format=fmt)


def _rng(key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


# --- one text: its paraphrases and values --------------------------------------------------

class _Text:
    """A history as one text will show it: chosen labels, paraphrased values, the summary."""

    def __init__(self, plan: _Plan, rows: list[list[str]], rng: random.Random):
        self.plan, self.rows, self.rng = plan, rows, rng
        cols = plan.columns
        # Labels: one paraphrase per field for the whole text, never two fields with one name.
        self.labels, used = [], set()
        for c in cols:
            label = rng.choice(c.label_options)
            if label.casefold() in used:
                label = c.label if c.label.casefold() not in used else f"{c.label} ({c.name})"
            used.add(label.casefold())
            self.labels.append(label)
        # Values: kept as they are in some texts, else one paraphrase per distinct value.
        self.paraphrase = rng.random() >= 0.2
        self._memo: list[dict[str, str]] = [{} for _ in cols]
        self._part_memo: list[dict[str, str]] = [{} for _ in cols]
        converters: list[Callable[[str], str] | None] = [
            self._converter(i) if c.values and self.paraphrase else None for i, c in enumerate(cols)]
        if any(converters):
            self.values = [[v if conv is None else conv(v) for v, conv in zip(row, converters)] for row in rows]
        else:
            self.values = rows
        self._summary = None

    def _converter(self, i: int) -> Callable[[str], str]:
        col, memo = self.plan.columns[i], self._memo[i]
        if col.split:
            sep = col.split

            def convert(v: str) -> str:
                out = memo.get(v)
                if out is None:
                    out = memo[v] = sep.join(self.part(i, p) for p in v.split(sep)) if v else v
                return out
            return convert
        return lambda v: self.part(i, v)

    def part(self, i: int, v: str) -> str:
        """One category value of column i as this text writes it."""
        memo = self._part_memo[i]
        out = memo.get(v)
        if out is None:
            table = self.plan.columns[i].values
            alternatives = table.get(v.casefold()) if table and self.paraphrase and v else None
            out = memo[v] = self.rng.choice((v, *alternatives)) if alternatives else v
        return out

    # Helpers the writers share.

    @property
    def noun(self) -> str:
        return self.plan.noun

    def noun_for(self, n: int) -> str:
        noun = self.plan.noun
        return noun[:-1] if n == 1 and noun.endswith("s") and not noun.endswith("ss") else noun

    def typed(self, i: int, v: str):
        """A value for JSON: numbers of numeric fields as numbers, missing ones as null."""
        kind = self.plan.columns[i].kind
        if kind == "int" or kind == "float":
            if v == "":
                return None
            if _INT.fullmatch(v):
                return int(v)
            if _FLOAT.fullmatch(v) and sum(ch.isdigit() for ch in v) <= 15:  # doubles hold 15 digits exactly
                return float(v)
        return v

    def category(self, cat: str) -> str:
        """A summary category as this text writes it ("Unspecified" for a missing value)."""
        return self.part(self.plan.group, cat) if cat else "Unspecified"

    def key(self, label: str, style: str) -> str:
        return _key(label, style)

    def summary(self) -> "_Summary | None":
        if self._summary is None and self.plan.group is not None:
            self._summary = _summarize(self.plan, self.rows)
        return self._summary

    def measure_text(self, m: int, value: float | int | None) -> str:
        if value is None:
            return ""
        col = self.plan.columns[m]
        if self.plan.stat == "mean":
            return f"{value:.2f}"
        if col.kind == "int":
            return str(value)
        decimals = col.decimals if col.kind == "float" else 2
        if abs(value) < 0.5 * 10 ** -decimals:
            value = 0.0  # no "-0.00"
        return f"{value:.{decimals}f}"

    def measure_number(self, m: int, value):
        if value is None:
            return None
        text = self.measure_text(m, value)
        return int(text) if _INT.fullmatch(text) else float(text)

    def measure_name(self, m: int) -> str:
        """"total amount" / "average rating", with this text's label for the measure."""
        label = _lower_first(self.labels[m])
        return f"{'average' if self.plan.stat == 'mean' else 'total'} {label}"


def _lower_first(label: str) -> str:
    if len(label) > 1 and label[1].isupper():
        return label  # an acronym: MCC
    return label[:1].lower() + label[1:]


def _key(label: str, style: str) -> str:
    if style == "as-is":
        return label
    words = [w for w in _NON_WORD.split(label) if w]
    if not words:
        return "field"
    if style == "camel":
        return words[0].lower() + "".join(w[:1].upper() + w[1:].lower() for w in words[1:])
    return "_".join(w.lower() for w in words)  # snake


def _tag(label: str, style: str) -> str:
    """An XML element or attribute name from a label."""
    name = _key(label, style)
    if not (name[:1].isalpha() or name[:1] == "_") or name[:3].lower() == "xml":
        name = f"f_{name}"
    return name


@dataclass
class _Summary:
    n_events: int
    totals: list  # per measure: sum or mean over all events (None: no value)
    categories: list[tuple[str, int, list]]  # (category as in the data, count, per-measure value), most frequent first


def _summarize(plan: _Plan, rows: list[list[str]]) -> _Summary:
    g, sep, measures = plan.group, plan.split, plan.measures
    parse = [int if plan.columns[m].kind == "int" and plan.stat == "sum" else float for m in measures]
    stats: dict[str, list] = {}  # category -> [count, sum per measure..., count per measure...]
    k = len(measures)
    totals = [0] * k
    counts = [0] * k
    for row in rows:
        v = row[g]
        cats = (v.split(sep) if v else []) if sep else [v]
        nums = []
        for j, m in enumerate(measures):
            x = _number(row[m], parse[j])
            nums.append(x)
            if x is not None:
                totals[j] += x
                counts[j] += 1
        for cat in cats:
            s = stats.get(cat)
            if s is None:
                s = stats[cat] = [0] + [0] * (2 * k)
            s[0] += 1
            for j, x in enumerate(nums):
                if x is not None:
                    s[1 + j] += x
                    s[1 + k + j] += 1
    mean = plan.stat == "mean"

    def finish(sums, ns):
        return [(sums[j] / ns[j] if ns[j] else None) if mean else (sums[j] if ns[j] else None) for j in range(k)]

    categories = [(cat, s[0], finish(s[1:1 + k], s[1 + k:])) for cat, s in stats.items()]
    categories.sort(key=lambda c: (-c[1], c[0]))
    return _Summary(len(rows), finish(totals, counts), categories)


def _number(text: str, parse):
    if not text:
        return None
    try:
        return parse(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


# --- the formats ---------------------------------------------------------------------------

def _structure(t: _Text, events: Callable[[list[str]], object]) -> dict:
    """The history as a dict (JSON, YAML): the events (`events(keys)`), maybe a summary before or after them."""
    rng = t.rng
    style = rng.choice(("as-is", "snake", "camel"))
    keys = _unique([t.key(label, style) for label in t.labels])
    root = t.key(rng.choice((t.noun, "events", "history", "records", "entries", "activity")), style)
    events = events(keys)
    summary = _summary_dict(t, style, keys) if rng.random() < 0.5 else None
    if summary is None:
        return {root: events}
    name = t.key(rng.choice(("summary", "overview", "stats")), style)
    return {name: summary, root: events} if rng.random() < 0.5 else {root: events, name: summary}


def _summary_dict(t: _Text, style: str, keys: list[str]) -> dict:
    s = t.summary()
    measures = t.plan.measures
    if s is None:
        return {t.key(f"number of {t.noun}", style): len(t.rows)}
    g = t.plan.group
    count, *totals, by = _unique([t.key(f"number of {t.noun}", style),
                                  *(t.key(t.measure_name(m), style) for m in measures),
                                  t.key(f"by {t.labels[g]}", style)])
    out = {count: len(t.rows)}
    for j, m in enumerate(measures):
        out[totals[j]] = t.measure_number(m, s.totals[j])
    name, n_key, *values_keys = _unique([keys[g], t.key(t.rng.choice(("count", f"number of {t.noun}", t.noun)), style),
                                         *(t.key(t.measure_name(m), style) for m in measures)])
    cats = []
    for cat, n, values in s.categories[:TOP_CATEGORIES]:
        entry = {name: t.category(cat), n_key: n}
        for j, m in enumerate(measures):
            entry[values_keys[j]] = t.measure_number(m, values[j])
        cats.append(entry)
    out[by] = cats
    return out


def _unique(keys: list[str]) -> list[str]:
    seen, out = set(), []
    for k in keys:
        name, n = k, 2
        while name in seen:
            name, n = f"{k}_{n}", n + 1
        seen.add(name)
        out.append(name)
    return out


def _json(t: _Text) -> str:
    def events(keys: list[str]) -> list[dict]:
        typed = t.typed
        return [{k: typed(i, v) for i, (k, v) in enumerate(zip(keys, row))} for row in t.values]

    data = _structure(t, events)
    indent = t.rng.choice((2, 4, 0))
    if indent:
        return json.dumps(data, indent=indent, ensure_ascii=False)
    # Compact: one event per line (about half the tokens of an indented document).
    def dump(value):
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            lines = ",\n".join(f"    {dump(item)}" for item in value)
            parts.append(f"  {dump(key)}: [\n{lines}\n  ]")
        else:
            parts.append(f"  {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(parts) + "\n}"


# YAML: the dict as a node graph handed to the (C, where present) emitter. Same text as
# yaml.safe_dump of the dict, about twice as fast (no representer, resolver answers memoized).
_YAML_TAG = "tag:yaml.org,2002:"


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    _memo: dict = {}

    def resolve(self, kind, value, implicit):
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)
        key = (value, implicit)
        tag = self._memo.get(key)
        if tag is None:
            if len(self._memo) > 500_000:
                self._memo.clear()
            tag = self._memo[key] = super().resolve(kind, value, implicit)
        return tag


def _yaml_node(value):
    if isinstance(value, yaml.Node):
        return value
    if isinstance(value, dict):
        return yaml.MappingNode(_YAML_TAG + "map", [(_yaml_node(k), _yaml_node(v)) for k, v in value.items()])
    if isinstance(value, list):
        return yaml.SequenceNode(_YAML_TAG + "seq", [_yaml_node(v) for v in value])
    if value is None:
        return yaml.ScalarNode(_YAML_TAG + "null", "null")
    if isinstance(value, bool):
        return yaml.ScalarNode(_YAML_TAG + "bool", "true" if value else "false")
    if isinstance(value, int):
        return yaml.ScalarNode(_YAML_TAG + "int", str(value))
    if isinstance(value, float):
        return yaml.ScalarNode(_YAML_TAG + "float", repr(value))
    return yaml.ScalarNode(_YAML_TAG + "str", str(value))


def _yaml(t: _Text) -> str:
    # Events straight to nodes: numbers keep the text serialization wrote ("12.50", not 12.5).
    kinds = [c.kind for c in t.plan.columns]
    str_tag = _YAML_TAG + "str"

    def tag(kind: str, v: str) -> str:
        if kind == "int" or kind == "float":
            if v == "":
                return _YAML_TAG + "null"
            if _INT.fullmatch(v):
                return _YAML_TAG + "int"
            if _FLOAT.fullmatch(v):
                return _YAML_TAG + "float"
        return str_tag

    def events(keys: list[str]) -> yaml.SequenceNode:
        Scalar = yaml.ScalarNode
        items = []
        for row in t.values:
            items.append(yaml.MappingNode(_YAML_TAG + "map", [
                (Scalar(str_tag, k), Scalar(str_tag if kind == "text" or kind == "time" else tag(kind, v),
                                            v if v or kind == "text" or kind == "time" else "null"))
                for k, kind, v in zip(keys, kinds, row)]))
        return yaml.SequenceNode(_YAML_TAG + "seq", items)

    node = _yaml_node(_structure(t, events))
    if t.rng.random() < 0.3:
        _flow_leaves(node)  # one `{Date: ..., Title: ...}` line per event
    return yaml.serialize(node, Dumper=_Dumper, allow_unicode=True, width=4096, indent=t.rng.choice((2, 4)))


def _flow_leaves(node) -> None:
    """Mark mappings that hold only scalars as flow style (what default_flow_style=None does)."""
    if isinstance(node, yaml.MappingNode):
        if all(isinstance(v, yaml.ScalarNode) for _, v in node.value):
            node.flow_style = True
        for _, v in node.value:
            _flow_leaves(v)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _flow_leaves(v)


def _xml_text(value: str) -> str:
    return _XML_INVALID.sub("", value)


def _xml(t: _Text) -> str:
    rng = t.rng
    style = rng.choice(("snake", "camel"))
    noun = t.noun
    root = ET.Element(_tag(rng.choice((noun, "history", "events", "user_history", "activity_log")), style))
    item = _tag(rng.choice((noun[:-1] if noun.endswith("s") else noun, "event", "record", "entry")), style)
    tags = _unique([_tag(label, style) for label in t.labels])
    attributes = rng.random() < 0.35  # <event date="..." title="..."/> instead of child elements
    if rng.random() < 0.5:
        root.set("count", str(len(t.rows)))
    summary = rng.random() < 0.5
    place_summary_first = rng.random() < 0.5
    if summary and place_summary_first:
        _xml_summary(t, root, style)
    for row in t.values:
        e = ET.SubElement(root, item)
        if attributes:
            for tag, v in zip(tags, row):
                e.set(tag, _xml_text(v))
        else:
            for tag, v in zip(tags, row):
                ET.SubElement(e, tag).text = _xml_text(v)
    if summary and not place_summary_first:
        _xml_summary(t, root, style)
    ET.indent(root, " " * rng.choice((2, 4)))
    body = ET.tostring(root, encoding="unicode")
    return ('<?xml version="1.0"?>\n' + body) if rng.random() < 0.5 else body


def _xml_summary(t: _Text, root, style: str) -> None:
    s = t.summary()
    el = ET.SubElement(root, _tag(t.rng.choice(("summary", "overview", "statistics")), style))
    el.set(_tag(f"number of {t.noun}", style), str(len(t.rows)))
    if s is None:
        return
    for j, m in enumerate(t.plan.measures):
        el.set(_tag(t.measure_name(m), style), t.measure_text(m, s.totals[j]))
    g = t.plan.group
    name, count, *measures = _unique([_tag(t.labels[g], style), "count",
                                      *(_tag(t.measure_name(m), style) for m in t.plan.measures)])
    for cat, n, values in s.categories[:TOP_CATEGORIES]:
        c = ET.SubElement(el, "category")
        c.set(name, _xml_text(t.category(cat)))
        c.set(count, str(n))
        for j, m in enumerate(t.plan.measures):
            c.set(measures[j], t.measure_text(m, values[j]))


def _csv(t: _Text) -> str:
    buf = io.StringIO()
    quoting = t.rng.choice((csv.QUOTE_MINIMAL, csv.QUOTE_MINIMAL, csv.QUOTE_ALL))
    writer = csv.writer(buf, quoting=quoting, lineterminator="\n")
    writer.writerow(t.labels)
    writer.writerows(t.values)
    return buf.getvalue().rstrip("\n")


def _md_cell(v: str) -> str:
    return v.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _markdown(t: _Text) -> str:
    rng = t.rng
    kinds = [c.kind for c in t.plan.columns]
    align = rng.random() < 0.5
    seps = [("---:" if k in ("int", "float") else ":---") if align else "---" for k in kinds]
    table = ["| " + " | ".join(_md_cell(x) for x in t.labels) + " |", "| " + " | ".join(seps) + " |"]
    table += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in t.values]
    parts = []
    if rng.random() < 0.7:
        parts.append(f"{rng.choice(('#', '##', '###'))} {_title(t)}")
    summary = _summary_lines(t, bullet=rng.choice(("-", "*")), emphasis=True) if rng.random() < 0.5 else []
    first = rng.random() < 0.5
    if summary and first:
        parts.append("\n".join(summary))
    parts.append("\n".join(table))
    if summary and not first:
        parts.append("\n".join(summary))
    return "\n\n".join(parts)


def _html(t: _Text) -> str:
    rng = t.rng
    def e(text: str) -> str:
        return html.escape(text, quote=False)  # quotes need no escaping in element text
    pad = " " * rng.choice((0, 2))
    nl = "\n" if pad or rng.random() < 0.5 else ""
    rows = [f"{pad}<tr>{''.join(f'<th>{e(x)}</th>' for x in t.labels)}</tr>"]
    rows += [f"{pad}<tr>{''.join(f'<td>{e(v)}</td>' for v in row)}</tr>" for row in t.values]
    sections = rng.random() < 0.5  # <thead>/<tbody>
    if sections:
        body = (f"<thead>{nl}{rows[0]}{nl}</thead>{nl}<tbody>{nl}" + nl.join(rows[1:])
                + (nl if len(rows) > 1 else "") + "</tbody>")
    else:
        body = nl.join(rows)
    caption = f"<caption>{e(_title(t))}</caption>{nl}" if rng.random() < 0.4 else ""
    table = f"<table>{nl}{caption}{body}{nl}</table>"
    parts = []
    if not caption and rng.random() < 0.6:
        level = rng.choice((1, 2, 3))
        parts.append(f"<h{level}>{e(_title(t))}</h{level}>")
    summary = _summary_lines(t, bullet="", emphasis=False) if rng.random() < 0.5 else []
    summary_html = ""
    if summary:
        summary_html = f"<ul>{nl}" + nl.join(f"{pad}<li>{e(line)}</li>" for line in summary) + f"{nl}</ul>"
    first = rng.random() < 0.5
    if summary_html and first:
        parts.append(summary_html)
    parts.append(table)
    if summary_html and not first:
        parts.append(summary_html)
    out = "\n".join(parts)
    if rng.random() < 0.3:
        out = f"<html>\n<body>\n{out}\n</body>\n</html>"
    return out


def _title(t: _Text) -> str:
    noun = t.noun
    return t.rng.choice((f"{noun[:1].upper()}{noun[1:]}", f"{noun[:1].upper()}{noun[1:]} history",
                         f"History of {noun}", "User activity", f"Recent {noun}", f"List of {noun}"))


# --- prose (the paper's Table 2) -----------------------------------------------------------

_SUM_LINES = ("{cat}: {n} {noun}, totaling {x}{unit}", "{cat} — {n} {noun} ({x}{unit} in total)",
              "{n} {noun} in {cat}, {x}{unit} altogether")
_MEAN_LINES = ("{cat}: {n} {noun}, {m} {x}", "{cat} — {n} {noun} ({m}: {x})",
               "{n} {noun} in {cat}, with an {m} of {x}")
_COUNT_LINES = ("{cat}: {n} {noun}", "{cat} — {n} {noun}", "{n} {noun} in {cat}")


def _category_line(t: _Text, template_index: int, cat: str, n: int, values: list) -> str:
    """One summary line: a category, its count and its measures."""
    measures = t.plan.measures
    unit = f" {t.plan.unit}" if t.plan.unit else ""
    noun = t.noun_for(n)
    if not measures:
        return _COUNT_LINES[template_index].format(cat=cat, n=n, noun=noun)
    if len(measures) == 1:
        m = measures[0]
        x = t.measure_text(m, values[0])
        if not x:
            return _COUNT_LINES[template_index].format(cat=cat, n=n, noun=noun)
        if t.plan.stat == "sum":
            return _SUM_LINES[template_index].format(cat=cat, n=n, noun=noun, x=x, unit=unit)
        return _MEAN_LINES[template_index].format(cat=cat, n=n, noun=noun, m=t.measure_name(m), x=x + unit)
    extras = "; ".join(f"{t.measure_name(m)} {t.measure_text(m, v)}{unit}"
                       for m, v in zip(measures, values) if v is not None)
    return f"{cat}: {n} {noun}" + (f"; {extras}" if extras else "")


def _summary_lines(t: _Text, bullet: str, emphasis: bool) -> list[str]:
    """Per category (most frequent first) count and totals, then the overall line."""
    s = t.summary()
    lines = []
    if s is not None:
        template_index = t.rng.randrange(3)
        for cat, n, values in s.categories[:TOP_CATEGORIES]:
            name = t.category(cat)
            if emphasis and template_index == 0:
                name = f"**{name}**"
            lines.append(_category_line(t, template_index, name, n, values))
        rest = len(s.categories) - TOP_CATEGORIES
        if rest > 0:
            lines.append(f"… and {rest} more {'category' if rest == 1 else 'categories'}")
    lines.append(_overall_line(t, s))
    return [f"{bullet} {line}" if bullet else line for line in lines]


def _overall_line(t: _Text, s: "_Summary | None") -> str:
    n = len(t.rows)
    head = t.rng.choice(("In total", "Overall", "All together"))
    text = f"{head}: {n} {t.noun_for(n)}"
    if s is not None:
        unit = f" {t.plan.unit}" if t.plan.unit else ""
        for j, m in enumerate(t.plan.measures):
            x = t.measure_text(m, s.totals[j])
            if x:
                text += (f", totaling {x}{unit}" if t.plan.stat == "sum" and len(t.plan.measures) == 1
                         else f", {t.measure_name(m)} {x}{unit}")
    return text


def _prose(t: _Text) -> str:
    rng = t.rng
    noun = t.noun
    cap = noun[:1].upper() + noun[1:]
    heading_style = rng.randrange(4)

    def heading(text: str) -> str:
        return (text, f"## {text}", f"{text}:", f"=== {text} ===")[heading_style]

    title = rng.choice((f"{cap} breakdown", f"Summary of {noun}", f"{cap} overview", "Activity report",
                        "User history"))
    if not t.rows:
        return f"{heading(title)}\n\nNo {noun}."
    bullet = rng.choice(("•", "-", "*"))
    parts = [heading(title)]
    lines = _summary_lines(t, bullet=bullet, emphasis=False)
    if t.plan.group is not None:
        group = t.labels[t.plan.group]
        section = rng.choice((f"By {_lower_first(group)}", "Categories", f"{group} breakdown"))
        parts.append(heading(section) + "\n" + "\n".join(lines))
    else:
        parts.append("\n".join(lines))
    parts.append(heading(rng.choice(("Details", f"{cap} details", "Event log", "In chronological order")))
                 + "\n" + _details(t))
    return "\n\n".join(parts)


def _details(t: _Text) -> str:
    """The events oldest first: a compact table, sentences, or a list."""
    rng = t.rng
    cols = t.plan.columns
    unit = t.plan.unit
    labels = [f"{label} ({unit})" if unit and i in t.plan.measures else label for i, label in enumerate(t.labels)]
    time_index = next((i for i, c in enumerate(cols) if c.kind == "time"), None)
    style = rng.randrange(3)
    if style == 0:
        return "\n".join([" | ".join(labels), *(" | ".join(row) for row in t.values)])
    if style == 1:
        lines = []
        for row in t.values:
            fields = "; ".join(f"{labels[i]}: {v}" for i, v in enumerate(row) if i != time_index and v != "")
            lines.append(f"On {row[time_index]} — {fields}." if time_index is not None else f"{fields}.")
        return "\n".join(lines)
    numbered = rng.random() < 0.5
    # A category or a title reads on its own; a bare number does not ("1, 12.00"): numbers carry their
    # field's name (and the unit of a measure), and a missing number is left out.
    named = [_lower_first(t.labels[i]) if c.kind in ("int", "float") else None for i, c in enumerate(cols)]
    units = [f" {unit}" if unit and i in t.plan.measures else "" for i in range(len(cols))]

    def shown(i: int, v: str) -> str | None:
        if named[i] is None:
            return v
        return f"{named[i]} {v}{units[i]}" if v != "" else None

    lines = []
    for k, row in enumerate(t.values, start=1):
        mark = f"{k}." if numbered else "-"
        parts = [x for i, v in enumerate(row) if i != time_index and (x := shown(i, v)) is not None]
        lines.append(f"{mark} {row[time_index]}: {', '.join(parts)}" if time_index is not None
                     else f"{mark} " + ", ".join(parts))
    return "\n".join(lines)


_WRITERS: dict[str, Callable[[_Text], str]] = {
    "json": _json, "markdown": _markdown, "html": _html, "yaml": _yaml, "xml": _xml, "csv": _csv, "prose": _prose,
}
