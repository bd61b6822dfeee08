"""The synthetic bank across two channels: anonymous website sessions, then logged-in app visits.

The website side is `clickstream.generate_clickstream` unchanged (same people, sessions, planted
intents). On top of it, drawn from a second numpy Generator seeded by `config.seed` (so the web
side is byte-identical to `synth-clicks` with the same web settings):

- app users: a share `app_user_share` of the people have the app. Their customer id is their
  person id (`visitor_id` of the plain clickstream); everyone else never logs in anywhere.
- linkage: each website session of an app user is linkable with probability `link_share` (the
  person logged in during the session, so the bank knows who it was from the session's end on).
  In the written clicks.csv a linked session carries the customer id as `visitor_id`; every other
  session (unlinked, or of a person without the app) gets its own anonymous id
  (`ANON_BASE + session number`), as a cookie that is never joined to anyone. So the
  `bank-clickstream` dataset ingests it as is, and Feast's per-user session rollups, keyed by
  user id and timestamped by session end, are exactly the linked web history of each app user.
- app visits: 1 + Poisson(mean_app_visits - 1) per app user, at daytime hours, from day
  `app_start_day` of the window. Each visit's homepage shows `tiles_shown` of the `TILES`
  (products: mortgage, credit card, savings, loans; servicing: payments, statements, help) in
  random order, and the user clicks at most one (a multinomial logit with a "no click" option).
  A tile's utility = its base + the person's segment tilt + app-side context (statements near the
  start of a month, payments near the end, the tile the user clicked on the previous visit, a
  position bias) + `intent_weight` x the person's recent web intent: the share of the person's
  website sessions (linked or not: the intent is the person's) that ended in the
  `intent_window_days` before the visit with an intent mapped to that tile (`INTENT_TILES`),
  recency-weighted. With probability `intent_noise` a visit ignores the web intent (the person
  came for something else); Gumbel noise does the rest.
- openings (the conversion label): a web shopping session that ended on a submitted application
  opens its product with probability 0.65, a started one 0.20, a browsing one 0.03, some 1..10 days
  after the session; a click on a product tile opens it with probability 0.08 within 1..5 days.
  A visit converts (`converted_product`) when the user opens a product in the `conversion_days`
  after it (the first one opened; "none" otherwise).

Files (written next to the website's clicks.csv, visitors.csv, planted_intents.csv):
  app_visits.csv   visit_id, user_id, ts, segment, region, tenure_days, device, clicked_tile
                   ("" = no click), converted_product ("none" or the product)
  app_tiles.csv    visit_id, position (0 = top), tile, clicked (0/1)
  openings.csv     user_id, ts, product
  links.csv        session_id, person_id, user_id (the customer id where linked, else empty),
                   session_end
Everything is a pure function of the config: the same config writes the same bytes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from producers.errors import Llm4esError
from producers.synthetic.clickstream import (
    INTENTS,
    SEGMENTS,
    Clickstream,
    ClickstreamConfig,
    ClickstreamError,
    _atomic_write,
    _output_folder,
    generate_clickstream,
    readme as web_readme,
    ClickstreamResult,
)

if TYPE_CHECKING:
    from producers.stores.warehouse import Home

CROSSCHANNEL_VERSION = 1
ANON_BASE = 10_000_000  # anonymous visitor ids: ANON_BASE + session number (never a customer id)
PRODUCT_TILES = ("mortgage", "credit_card", "savings", "loans")
SERVICING_TILES = ("payments", "statements", "help")
TILES: tuple[str, ...] = PRODUCT_TILES + SERVICING_TILES
# The web intent behind each tile (account servicing feeds both payments and statements).
INTENT_TILES: dict[str, tuple[str, ...]] = {
    "mortgage_shopping": ("mortgage",), "credit_card_shopping": ("credit_card",),
    "savings_and_investing": ("savings",), "loan_shopping": ("loans",),
    "account_servicing": ("payments", "statements"), "help_and_support": ("help",),
}
# Base utility per tile: app users mostly come to service their accounts.
TILE_BASE = {"mortgage": -1.6, "credit_card": -1.2, "savings": -1.3, "loans": -1.4,
             "payments": 0.2, "statements": -0.2, "help": -0.8}
NO_CLICK_UTILITY = 0.3
POSITION_BIAS = (0.6, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0)
# A product a shopping session is about (for openings).
SHOPPING_PRODUCT = {"mortgage_shopping": "mortgage", "credit_card_shopping": "credit_card",
                    "savings_and_investing": "savings", "loan_shopping": "loans"}
APP_DEVICES = ("ios", "android")

APP_VISITS_COLUMNS = ["visit_id", "user_id", "ts", "segment", "region", "tenure_days", "device",
                      "clicked_tile", "converted_product"]
APP_TILES_COLUMNS = ["visit_id", "position", "tile", "clicked"]
OPENINGS_COLUMNS = ["user_id", "ts", "product"]
LINKS_COLUMNS = ["session_id", "person_id", "user_id", "session_end"]
APP_FILES = ("app_visits.csv", "app_tiles.csv", "openings.csv", "links.csv")


@dataclass(frozen=True)
class CrossChannelConfig:
    web: ClickstreamConfig = ClickstreamConfig()
    app_user_share: float = 0.6  # people who have the app
    link_share: float = 0.5  # an app user's web session is linkable (logged in during it) with this chance
    mean_app_visits: float = 6.0  # per app user: 1 + Poisson(mean - 1)
    app_start_day: int = 14  # app visits start this many days into the window (some web history first)
    tiles_shown: int = 4  # K tiles on each homepage
    intent_weight: float = 3.0  # how much the recent web intent moves a tile's utility
    intent_noise: float = 0.3  # chance that a visit ignores the web intent
    intent_window_days: float = 14.0  # web sessions that ended this long before the visit count
    conversion_days: int = 14  # N: a visit converts when a product is opened in the N days after it

    @property
    def seed(self) -> int:
        return self.web.seed

    def check(self) -> None:
        """Raise ClickstreamError naming the first bad value."""
        self.web.check()
        for name in ("app_user_share", "link_share", "intent_noise"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ClickstreamError(f"{name} must be in [0, 1], not {value!r}")
        if self.mean_app_visits < 1:
            raise ClickstreamError(f"mean_app_visits must be at least 1, not {self.mean_app_visits!r}")
        if not 2 <= self.tiles_shown <= len(TILES):
            raise ClickstreamError(f"tiles_shown must be in [2, {len(TILES)}], not {self.tiles_shown!r}")
        if not 0 <= self.app_start_day < self.web.days:
            raise ClickstreamError(f"app_start_day must be in [0, days={self.web.days}), not {self.app_start_day!r}")
        if self.intent_window_days <= 0 or self.conversion_days < 1:
            raise ClickstreamError("intent_window_days must be positive and conversion_days at least 1")

    def as_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "web"}, "web": self.web.as_json()}


@dataclass(frozen=True)
class CrossChannel:
    config: CrossChannelConfig
    web: Clickstream  # clicks re-keyed: visitor_id = customer id where linked, else anonymous
    links: pd.DataFrame
    app_visits: pd.DataFrame
    app_tiles: pd.DataFrame
    openings: pd.DataFrame


@dataclass(frozen=True)
class CrossChannelResult:
    web: ClickstreamResult
    files: dict[str, Path]
    n_app_users: int
    n_app_visits: int
    n_linked_sessions: int
    n_sessions: int
    click_share: float  # app visits with a click
    conversion_share: float  # app visits followed by an opening within N days
    seconds: float = 0.0
    clicks_by_tile: dict[str, int] = field(default_factory=dict)


def _session_table(web: Clickstream) -> pd.DataFrame:
    """One row per web session: person, intent, end (seconds from the window start), application outcome."""
    c = web.clicks
    ts = pd.to_datetime(c["ts"])
    origin = pd.Timestamp(web.config.start)
    g = pd.DataFrame({"session_id": c["session_id"], "person_id": c["visitor_id"],
                      "t": (ts - origin).dt.total_seconds().astype(np.int64),
                      "started": c["page_type"].eq("application"),
                      "submitted": c["page"].str.endswith("/submitted")})
    s = g.groupby("session_id", sort=True).agg(person_id=("person_id", "first"), start=("t", "min"),
                                               end=("t", "max"), started=("started", "any"),
                                               submitted=("submitted", "any")).reset_index()
    return s.merge(web.intents, on="session_id", how="left")


def generate_crosschannel(config: CrossChannelConfig = CrossChannelConfig()) -> CrossChannel:
    """Draw both channels in memory: a pure function of `config`."""
    config.check()
    web = generate_clickstream(config.web)
    # A second stream, so the web side stays identical to the plain generator's for the same seed.
    rng = np.random.default_rng([config.seed, 1729])
    sessions = _session_table(web)
    people = web.visitors.set_index("visitor_id")
    person_ids = people.index.to_numpy()
    has_app = rng.random(len(person_ids)) < config.app_user_share
    app_people = set(person_ids[has_app].tolist())
    linked = (np.array([p in app_people for p in sessions["person_id"]])
              & (rng.random(len(sessions)) < config.link_share))
    session_no = sessions["session_id"].str[1:].astype(np.int64).to_numpy()
    bank_id = np.where(linked, sessions["person_id"].to_numpy(), ANON_BASE + session_no)
    origin = np.datetime64(config.web.start.isoformat(), "s")

    def iso(seconds) -> np.ndarray:
        return np.datetime_as_string(origin + np.asarray(seconds, dtype=np.int64).astype("timedelta64[s]"), unit="s")

    links = pd.DataFrame({"session_id": sessions["session_id"], "person_id": sessions["person_id"],
                          "user_id": pd.array([int(p) if k else None for p, k in zip(sessions["person_id"], linked)],
                                              dtype="Int64"),
                          "session_end": iso(sessions["end"])}, columns=LINKS_COLUMNS)

    # The website files as the bank sees them: linked sessions under the customer id, the rest anonymous.
    rekey = dict(zip(sessions["session_id"], bank_id.tolist()))
    clicks = web.clicks.copy()
    clicks["visitor_id"] = clicks["session_id"].map(rekey).astype(np.int64)
    clicks = clicks.sort_values(["visitor_id", "ts", "session_id"], kind="stable").reset_index(drop=True)
    clicks.attrs.update(web.clicks.attrs)
    owner = dict(zip(bank_id.tolist(), sessions["person_id"].tolist()))
    ids = sorted(owner)
    visitors = people.loc[[owner[i] for i in ids], ["opened_product", "segment", "region"]].reset_index(drop=True)
    visitors.insert(0, "visitor_id", ids)
    web_rekeyed = Clickstream(config.web, clicks, visitors, web.intents)

    # Openings after web shopping sessions (the person's, linked or not).
    openings: list[tuple[int, int, str]] = []
    shop = sessions[sessions["intent"].isin(SHOPPING_PRODUCT)]
    p_open = np.where(shop["submitted"], 0.65, np.where(shop["started"], 0.20, 0.03))
    opens = rng.random(len(shop)) < p_open
    delays = rng.integers(86400, 10 * 86400, len(shop))
    for (person, end, intent), o, d in zip(shop[["person_id", "end", "intent"]].itertuples(index=False), opens, delays):
        if o and person in app_people:
            openings.append((int(person), int(end + d), SHOPPING_PRODUCT[intent]))

    by_person = {p: g for p, g in sessions.groupby("person_id")}
    hour_p = np.array([0.2] * 6 + [1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 3, 2, 1], dtype=float)
    hour_p /= hour_p.sum()
    window = config.intent_window_days * 86400
    visits: dict[str, list] = {c: [] for c in APP_VISITS_COLUMNS}
    tiles: dict[str, list] = {c: [] for c in APP_TILES_COLUMNS}
    visit_no = 0
    tile_index = {t: i for i, t in enumerate(TILES)}
    for person in sorted(app_people):
        row = people.loc[person]
        tilt = np.array(SEGMENTS[row["segment"]][1])
        tilt = np.log(tilt / tilt.mean())  # the segment's taste, per intent
        segment_tilt = np.zeros(len(TILES))
        for k, intent in enumerate(INTENTS):
            for t in INTENT_TILES[intent]:
                segment_tilt[tile_index[t]] += 0.5 * tilt[k]
        tenure = int(rng.integers(30, 3650))
        device = APP_DEVICES[int(rng.random() < 0.45)]
        n = 1 + int(rng.poisson(config.mean_app_visits - 1))
        days = rng.integers(config.app_start_day, config.web.days, n)
        starts = np.sort(days * 86400 + rng.choice(24, size=n, p=hour_p) * 3600 + rng.integers(0, 3600, n))
        mine = by_person.get(person)
        last_click: str | None = None
        for t in starts.tolist():
            visit_no += 1
            visit_id = f"v{visit_no:07d}"
            intent_u = np.zeros(len(TILES))
            if mine is not None and rng.random() >= config.intent_noise:
                recent = mine[(mine["end"] < t) & (mine["end"] >= t - window)]
                if len(recent):
                    w = np.exp(-(t - recent["end"].to_numpy()) / (window / 2))  # recency-weighted
                    for intent, wi in zip(recent["intent"], w):
                        for tile in INTENT_TILES[intent]:
                            intent_u[tile_index[tile]] += wi
                    intent_u /= w.sum()
            day = int((origin + np.timedelta64(int(t), "s")).astype("datetime64[D]").astype(object).day)
            context = np.zeros(len(TILES))
            context[tile_index["statements"]] += 0.8 if day <= 5 else 0.0
            context[tile_index["payments"]] += 0.6 if day >= 24 else 0.0
            if last_click is not None:
                context[tile_index[last_click]] += 0.5
            shown = rng.permutation(len(TILES))[: config.tiles_shown]
            base = np.array([TILE_BASE[x] for x in TILES])
            utility = (base + segment_tilt + context + config.intent_weight * intent_u)[shown]
            utility = utility + np.array(POSITION_BIAS[: config.tiles_shown])
            options = np.append(utility, NO_CLICK_UTILITY) + rng.gumbel(size=config.tiles_shown + 1)
            choice = int(np.argmax(options))
            clicked = TILES[shown[choice]] if choice < config.tiles_shown else ""
            if clicked:
                last_click = clicked
                if clicked in PRODUCT_TILES and rng.random() < 0.08:
                    openings.append((int(person), int(t + rng.integers(3600, 5 * 86400)), clicked))
            visits["visit_id"].append(visit_id)
            visits["user_id"].append(int(person))
            visits["ts"].append(int(t))
            visits["segment"].append(row["segment"])
            visits["region"].append(row["region"])
            visits["tenure_days"].append(tenure + int(t // 86400))
            visits["device"].append(device)
            visits["clicked_tile"].append(clicked)
            for pos, k in enumerate(shown.tolist()):
                tiles["visit_id"].append(visit_id)
                tiles["position"].append(pos)
                tiles["tile"].append(TILES[k])
                tiles["clicked"].append(int(TILES[k] == clicked))

    opened = pd.DataFrame(openings, columns=OPENINGS_COLUMNS).sort_values(["user_id", "ts", "product"], kind="stable")
    visit_frame = pd.DataFrame({c: visits[c] for c in APP_VISITS_COLUMNS if c != "converted_product"})
    visit_frame["converted_product"] = _conversions(visit_frame, opened, config.conversion_days * 86400)
    visit_frame["ts"] = iso(visit_frame["ts"])
    opened = opened.reset_index(drop=True)
    opened["ts"] = iso(opened["ts"])
    return CrossChannel(config, web_rekeyed, links, visit_frame[APP_VISITS_COLUMNS],
                        pd.DataFrame(tiles, columns=APP_TILES_COLUMNS), opened)


def _conversions(visits: pd.DataFrame, openings: pd.DataFrame, horizon_s: int) -> list[str]:
    """The first product each visit's user opened in (ts, ts + horizon], else "none"."""
    by_user = {u: g[["ts", "product"]].to_numpy() for u, g in openings.groupby("user_id")}
    out = []
    for user, t in zip(visits["user_id"], visits["ts"]):
        rows = by_user.get(user)
        hit = "none"
        if rows is not None:
            for ot, product in rows:  # sorted by time
                if t < ot <= t + horizon_s:
                    hit = product
                    break
        out.append(hit)
    return out


def write_crosschannel(out_dir: Path, config: CrossChannelConfig = CrossChannelConfig()) -> CrossChannelResult:
    """Write the re-keyed website files (the `bank-clickstream` layout) and the app files into `out_dir`."""
    t0 = time.perf_counter()
    data = generate_crosschannel(config)
    out_dir = _output_folder(out_dir)
    web = data.web
    by_intent = web.intents["intent"].value_counts()
    web_result = ClickstreamResult(
        out_dir=out_dir, config=config.web, files={n: out_dir / n for n in ("clicks.csv", "visitors.csv",
                                                                            "planted_intents.csv", "README.txt")},
        n_visitors=len(web.visitors), n_sessions=len(web.intents), n_events=len(web.clicks),
        sessions_by_intent={i: int(by_intent.get(i, 0)) for i in INTENTS}, noise_share=web.noise_share,
        opened_share=float(web.visitors["opened_product"].mean()))
    csv = {"lineterminator": "\n", "index": False}
    _atomic_write(out_dir / "clicks.csv", lambda p: web.clicks.to_csv(p, float_format="%.1f", **csv))
    _atomic_write(out_dir / "visitors.csv", lambda p: web.visitors.to_csv(p, **csv))
    _atomic_write(out_dir / "planted_intents.csv", lambda p: web.intents.to_csv(p, **csv))
    for name, frame in zip(APP_FILES, (data.app_visits, data.app_tiles, data.openings, data.links)):
        _atomic_write(out_dir / name, lambda p, f=frame: f.to_csv(p, **csv))
    v = data.app_visits
    counts = v["clicked_tile"].value_counts()
    result = CrossChannelResult(
        web=web_result, files={n: out_dir / n for n in APP_FILES}, n_app_users=int(v["user_id"].nunique()),
        n_app_visits=len(v), n_linked_sessions=int(data.links["user_id"].notna().sum()), n_sessions=len(data.links),
        click_share=float(v["clicked_tile"].ne("").mean()) if len(v) else 0.0,
        conversion_share=float(v["converted_product"].ne("none").mean()) if len(v) else 0.0,
        clicks_by_tile={t: int(counts.get(t, 0)) for t in TILES})
    _atomic_write(out_dir / "README.txt", lambda p: p.write_text(web_readme(web_result) + readme(config, result)))
    return replace(result, seconds=time.perf_counter() - t0)


def readme(c: CrossChannelConfig, r: CrossChannelResult) -> str:
    """The cross-channel part of README.txt (no run times: the bytes must not vary)."""
    settings = json.dumps({k: v for k, v in c.as_json().items() if k != "web"}, sort_keys=True)
    return f"""
Cross-channel extension (llm4es, cross-channel v{CROSSCHANNEL_VERSION}; producers/synthetic/crosschannel.py,
`llm4es synth-clicks --app-users SHARE`) with
  {settings}
In this folder clicks.csv and visitors.csv are keyed as the bank sees the website: a session linked to an
app user (the person logged in during it; {r.n_linked_sessions:,} of {r.n_sessions:,} sessions) carries the
customer id as visitor_id; every other session has its own anonymous id ({ANON_BASE:,} + session number).
{r.n_app_users:,} app users made {r.n_app_visits:,} app visits; {r.click_share:.1%} clicked a tile and
{r.conversion_share:.1%} were followed by an opened product within {c.conversion_days} days.

Files:
  app_visits.csv  visit_id, user_id (customer id), ts, segment, region, tenure_days, device,
                  clicked_tile ("" = no click), converted_product ("none" or the first product opened)
  app_tiles.csv   visit_id, position (0 = top), tile, clicked: the {c.tiles_shown} tiles each homepage showed
  openings.csv    user_id, ts, product: every product opened
  links.csv       session_id, person_id, user_id (empty where anonymous), session_end: the truth of who
                  browsed, kept aside like planted_intents.csv

How the app side was drawn: a tile's utility = a base per tile + the segment's taste + app context
(statements in the first 5 days of a month, payments from the 24th, the tile clicked on the previous
visit, a top-position bias) + {c.intent_weight:g} x the recency-weighted share of the person's web
sessions that ended in the {c.intent_window_days:g} days before the visit with an intent behind the tile
(ignored on {c.intent_noise:.0%} of the visits); a Gumbel draw picks one tile or no click.
Openings: a web shopping session's product with chance 0.65 (submitted application), 0.20 (started),
0.03 (browsing), 1..10 days later; a product tile click opens it with chance 0.08 within 5 days.
"""


def synth_command(out_dir: Path, visitors: int, seed: int, days: int, app_users: float, link_share: float,
                  tiles: int, conversion_days: int) -> list[str]:
    """`llm4es synth-clicks ... --app-users SHARE`: write both channels, return the lines to print."""
    config = CrossChannelConfig(web=ClickstreamConfig(visitors=visitors, seed=seed, days=days),
                                app_user_share=app_users, link_share=link_share, tiles_shown=tiles,
                                conversion_days=conversion_days)
    r = write_crosschannel(out_dir, config)
    w = r.web
    return [f"{w.out_dir}: {w.n_sessions:,} web sessions, {w.n_events:,} clicks; {r.n_linked_sessions:,} sessions "
            f"linked to {r.n_app_users:,} app users, the rest anonymous; {r.n_app_visits:,} app visits "
            f"({r.click_share:.0%} clicked one of {tiles} tiles, {r.conversion_share:.0%} converted within "
            f"{conversion_days} days) in {r.seconds:.1f}s",
            f"next: llm4es ingest bank-clickstream --source {w.out_dir}, then sessions/intents/publish and "
            f"llm4es evaluate-crosschannel bank-clickstream --source {w.out_dir}"]


class CrossChannelSourceError(Llm4esError, ValueError):
    """The app side given to the evaluation is not the one drawn with the web side in the warehouse."""


def require_web_side_from(home: Home, dataset: str, source: Path) -> None:
    """Stop unless the warehouse's web side was ingested from `source`'s clicks.csv (the last ingest lists it, by
    sha256, appends included). App and web ids match only within one generation: another folder's app side
    (say the default set ingested without --source) joins app users to unrelated visitors and gives a report of
    nonsense without a word."""
    from producers.stores.cache import sha256_file
    from producers.stores.warehouse import last_ingest, stored_definition

    clicks = Path(source) / "clicks.csv"
    if not clicks.is_file():
        raise CrossChannelSourceError(f"{clicks}: not found; the web side of the app data is the clicks.csv beside "
                                      "app_visits.csv")
    con = home.connect(read_only=True)
    try:
        ingest = last_ingest(con, stored_definition(con, dataset).schema) or {}
    finally:
        con.close()
    stored = {f.get("sha256") for f in json.loads(ingest.get("files") or "[]") if f.get("table") == "clicks"}
    if sha256_file(clicks) not in stored:
        raise CrossChannelSourceError(
            f"{dataset}'s web side was not ingested from {clicks} (its last ingest read {ingest.get('source')}), so "
            f"its visitors are not the app's users: run `llm4es ingest {dataset} --source {Path(source)}` and the "
            "session, intent and publish steps first")
