"""A synthetic clickstream of a bank's website, with the intent of every session planted and kept aside.

Session-intent producers (LLM-proposed taxonomies, labels distilled into a classifier) have no
ground truth on real web logs. Here every session is drawn from one of `PLANTED_INTENTS`, each
with its own distribution over pages, page types and search queries, so a check can compare the
intents a producer recovers with the planted ones (`planted_intents.csv`, which the built-in
`bank-clickstream` dataset definition never reads).

How a visitor is drawn (everything from one numpy Generator seeded with `config.seed`, so the
same config writes the same files byte for byte):
- a segment (mass market, affluent, student, ...) and a region; a persona: a Dirichlet mix over
  the intents, tilted by the segment and concentrated (small alpha) so most visitors have one or
  two main intents; a propensity to start an application; a usual device;
- 1 + Poisson(mean_sessions - 1) sessions on random days of the window, at daytime-weighted
  hours, at least `min_session_gap_s` (1 hour) apart, so a 30-minute inactivity cut recovers them;
- per session: one intent from the persona; 3..25 events (lognormal length, shorter for account
  servicing and help); each event is, with probability `noise_share`, a generic page (home,
  promotions, blog, ...) and otherwise a page of the intent; search events carry a query from the
  intent's templates (noise searches a generic one); a few events (`stray_share`) are pages of
  another of the visitor's intents; shopping sessions end on the application
  page with the visitor's propensity (and half of those on the submitted page);
- dwell time: lognormal by page type (capped at 25 minutes); the next click follows the dwell
  plus a few seconds, so gaps inside a session stay below 30 minutes;
- `opened_product`: 1 with a probability that grows with the visitor's shopping sessions, most
  with submitted applications (see `_opened_probability`).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from producers.errors import Llm4esError

# Bump when the generated data changes for the same config: cached default copies regenerate.
GENERATOR_VERSION = 1

PLANTED_INTENTS: dict[str, str] = {
    "mortgage_shopping": "comparing mortgages: fixed and adjustable rates, refinancing, payment and affordability "
                         "calculators, pre-approval, mortgage applications",
    "credit_card_shopping": "comparing credit cards: cash back, travel rewards, balance transfer, student and "
                            "secured cards, card applications",
    "savings_and_investing": "savings and investments: high-yield savings, CDs, money market, brokerage and "
                             "retirement (IRA) accounts, savings and retirement calculators",
    "loan_shopping": "personal and auto loans: loan rates, debt consolidation, new and used car loans, "
                     "loan payment calculators, loan applications",
    "account_servicing": "managing existing accounts: log in, balances and activity, statements, transfers, "
                         "bill pay, mobile deposit, settings",
    "help_and_support": "getting help: lost or stolen card, fraud and disputes, password reset, locking a card, "
                        "contacting the bank",
}
INTENTS: tuple[str, ...] = tuple(PLANTED_INTENTS)

# Dwell seconds per page type: (median, sigma of the log).
PAGE_TYPES: dict[str, tuple[float, float]] = {
    "home": (8, 0.6), "product": (50, 0.7), "rate_comparison": (75, 0.6), "calculator": (140, 0.6),
    "application": (200, 0.7), "login": (12, 0.5), "account_dashboard": (35, 0.7), "statements": (60, 0.8),
    "transfer": (50, 0.6), "bill_pay": (55, 0.6), "account_settings": (40, 0.7), "help_article": (70, 0.7),
    "contact": (45, 0.7), "search": (10, 0.6), "branch_locator": (30, 0.6), "offers": (25, 0.7),
    "content": (60, 0.9),
}
DEVICES = ("desktop", "mobile", "tablet")
DEVICE_SHARES = (0.5, 0.42, 0.08)
REGIONS = ("northeast", "midwest", "south", "west")
REGION_SHARES = (0.18, 0.21, 0.38, 0.23)
# Segment share, and how it tilts the persona (weights over INTENTS, in order).
SEGMENTS: dict[str, tuple[float, tuple[float, ...]]] = {
    "mass_market": (0.50, (1.0, 1.2, 0.8, 1.2, 2.0, 1.0)),
    "young_professional": (0.20, (1.2, 1.5, 1.0, 1.0, 1.6, 0.8)),
    "affluent": (0.15, (1.5, 0.8, 2.0, 0.5, 1.5, 0.6)),
    "student": (0.10, (0.2, 2.0, 0.5, 0.8, 1.5, 1.2)),
    "small_business": (0.05, (0.6, 1.0, 1.0, 1.2, 2.0, 1.0)),
}
# Session start hour of day: quiet at night, busy in the evening.
HOUR_WEIGHTS = (1, 0.5, 0.3, 0.3, 0.3, 0.5, 1, 2, 3, 4, 4, 4, 5, 5, 4, 4, 4, 4, 5, 6, 6, 5, 4, 2)

# (page_type, page, weight). Some pages are shared between intents (login, credit score, find a
# branch, the FAQ) and every intent searches, so single clicks are ambiguous on purpose.
Page = tuple[str, str, float]
SEARCH: Page = ("search", "search", 0.0)
NOISE_PAGES: list[Page] = [
    ("home", "home", 5.0), ("offers", "offers/current-promotions", 1.2), ("content", "about/our-bank", 0.5),
    ("content", "blog/money-tips", 0.8), ("content", "blog/market-update", 0.4), ("content", "about/careers", 0.3),
    ("content", "legal/privacy", 0.2), ("branch_locator", "locations/find-branch", 0.5), ("search", "search", 0.6),
    ("help_article", "help/faq", 0.5), ("login", "login", 0.4),
]
INTENT_PAGES: dict[str, list[Page]] = {
    "mortgage_shopping": [
        ("product", "mortgage/30-year-fixed", 4), ("product", "mortgage/15-year-fixed", 2.5),
        ("product", "mortgage/adjustable-rate", 1.5), ("product", "mortgage/first-time-buyers", 2),
        ("product", "mortgage/refinance", 2), ("product", "mortgage/home-equity", 1),
        ("rate_comparison", "rates/mortgage", 4), ("calculator", "calculators/mortgage-payment", 3),
        ("calculator", "calculators/home-affordability", 2), ("help_article", "help/mortgage-preapproval", 1.5),
        ("help_article", "help/closing-costs", 1), ("contact", "contact/mortgage-advisor", 1),
        ("branch_locator", "locations/find-branch", 0.4), ("search", "search", 2),
    ],
    "credit_card_shopping": [
        ("product", "cards/cashback", 4), ("product", "cards/travel-rewards", 3),
        ("product", "cards/balance-transfer", 2), ("product", "cards/student", 1.5), ("product", "cards/secured", 1),
        ("rate_comparison", "cards/compare", 4), ("calculator", "calculators/balance-transfer", 1.5),
        ("calculator", "calculators/rewards", 1), ("help_article", "help/credit-score", 1.5),
        ("help_article", "help/card-benefits", 1), ("offers", "offers/card-bonus", 1.5), ("search", "search", 2),
    ],
    "savings_and_investing": [
        ("product", "savings/high-yield", 4), ("product", "savings/certificates-of-deposit", 2.5),
        ("product", "savings/money-market", 1.5), ("product", "investing/brokerage", 2.5),
        ("product", "investing/retirement-ira", 2), ("product", "investing/managed-portfolios", 1),
        ("rate_comparison", "rates/savings", 3.5), ("calculator", "calculators/savings-goal", 2),
        ("calculator", "calculators/retirement", 2), ("calculator", "calculators/cd-earnings", 1),
        ("help_article", "help/deposit-insurance", 1), ("help_article", "help/ira-rollover", 1),
        ("content", "blog/market-update", 0.8), ("search", "search", 2),
    ],
    "loan_shopping": [
        ("product", "loans/personal", 3.5), ("product", "loans/debt-consolidation", 2),
        ("product", "loans/auto-new", 3), ("product", "loans/auto-used", 2), ("product", "loans/auto-refinance", 1.5),
        ("product", "loans/home-improvement", 1), ("rate_comparison", "rates/personal-loans", 2.5),
        ("rate_comparison", "rates/auto-loans", 2.5), ("calculator", "calculators/loan-payment", 3),
        ("calculator", "calculators/auto-loan", 2), ("help_article", "help/credit-score", 1),
        ("help_article", "help/loan-prequalification", 1.5), ("search", "search", 2),
    ],
    "account_servicing": [
        ("login", "login", 5), ("account_dashboard", "account/dashboard", 5),
        ("account_dashboard", "account/activity", 2.5), ("account_dashboard", "account/deposit-check", 1.2),
        ("statements", "account/statements", 3), ("statements", "account/tax-documents", 0.8),
        ("transfer", "account/transfer", 3), ("transfer", "account/zelle", 1.5), ("bill_pay", "account/bill-pay", 2),
        ("account_settings", "account/settings", 1.5), ("account_settings", "account/alerts", 1),
        ("search", "search", 0.8),
    ],
    "help_and_support": [
        ("help_article", "help/lost-card", 3), ("help_article", "help/report-fraud", 2.5),
        ("help_article", "help/reset-password", 3), ("help_article", "help/dispute-charge", 2),
        ("help_article", "help/lock-card", 1.5), ("help_article", "help/routing-number", 1.5),
        ("help_article", "help/faq", 1), ("contact", "contact/phone", 2.5), ("contact", "contact/chat", 2),
        ("contact", "contact/secure-message", 1), ("login", "login", 1.5),
        ("account_settings", "account/card-controls", 1.5), ("branch_locator", "locations/find-branch", 1),
        ("search", "search", 2.5),
    ],
}
# Where a shopping session that applies ends: the form, then (half the time) its confirmation.
APPLICATION_PAGES: dict[str, list[tuple[str, float]]] = {
    "mortgage_shopping": [("apply/mortgage", 1.0)],
    "credit_card_shopping": [("apply/credit-card", 1.0)],
    "savings_and_investing": [("apply/open-savings", 0.6), ("apply/open-brokerage", 0.4)],
    "loan_shopping": [("apply/personal-loan", 0.55), ("apply/auto-loan", 0.45)],
}
SUBMITTED_SHARE = 0.55
# Median events per session by intent (lognormal, sigma 0.5, clipped to the config's bounds).
SESSION_LENGTH: dict[str, float] = {
    "mortgage_shopping": 10, "credit_card_shopping": 8, "savings_and_investing": 9, "loan_shopping": 9,
    "account_servicing": 6, "help_and_support": 6,
}
SERVICING_LOGIN_ENTRY = 0.7  # account servicing sessions usually start on the login page

# Search queries: `{a|b|c}` picks one alternative; a few get a generic suffix.
QUERIES: dict[str, list[str]] = {
    "mortgage_shopping": [
        "{30|15|20} year mortgage rates", "{30|15} year fixed mortgage", "mortgage rates{| today| this week}",
        "how much house can i afford", "mortgage {preapproval|pre approval|prequalification}",
        "first time home buyer {program|loan|grants}", "refinance {my mortgage|rates|calculator}",
        "home equity line of credit", "arm vs fixed mortgage", "closing costs {estimate|calculator}",
    ],
    "credit_card_shopping": [
        "cash back credit card", "{best|} travel rewards card", "balance transfer card{| 0 apr| fee}",
        "student credit card", "credit card {sign up bonus|annual fee|comparison|no foreign transaction fee}",
        "secured credit card to build credit", "airline miles card", "credit card {apr|interest rate}",
    ],
    "savings_and_investing": [
        "high yield savings {account|rates|interest}", "cd rates{| 12 month| 6 month| today}", "open a roth ira",
        "ira rollover", "money market account rates", "brokerage account fees",
        "how much to save for retirement", "compound interest calculator",
    ],
    "loan_shopping": [
        "personal loan rates", "auto loan rates{| new car| used car}", "debt consolidation loan",
        "car loan calculator", "refinance my car loan", "home improvement loan",
        "personal loan {prequalification|requirements}",
        "loan payment calculator {3|5|7} years",
    ],
    "account_servicing": [
        "check balance", "download {statement|statements}", "how to transfer money", "zelle {limit|not working}",
        "set up direct deposit", "pay my bill", "mobile check deposit", "change my address", "tax form 1099",
    ],
    "help_and_support": [
        "how to report a lost card", "lost {debit|credit} card", "report fraud", "unauthorized charge on my card",
        "reset password", "forgot username", "dispute a charge", "lock my card", "routing number",
        "customer service {phone number|hours}", "card stolen what to do",
    ],
}
NOISE_QUERIES = ["bank holiday hours", "branch near me", "careers", "mobile app", "interest", "fees", "contact us"]
QUERY_SUFFIXES = (" online", " bank", " app")
QUERY_SUFFIX_SHARE = 0.15

CLICKS_COLUMNS = ["visitor_id", "session_id", "ts", "page_type", "page", "dwell_s", "query", "device"]
VISITORS_COLUMNS = ["visitor_id", "opened_product", "segment", "region"]
INTENTS_COLUMNS = ["session_id", "intent"]
FILES = ("clicks.csv", "visitors.csv", "planted_intents.csv", "README.txt")
MAX_DWELL_S = 1500.0  # 25 minutes: with the few seconds before the next click, gaps stay under 30


class ClickstreamError(Llm4esError, ValueError):
    """The synthetic clickstream cannot be generated as asked (bad config value, unwritable folder)."""


@dataclass(frozen=True)
class ClickstreamConfig:
    visitors: int = 2000
    seed: int = 0
    start: date = date(2024, 1, 1)  # day 0 (the built-in dataset's window is 2024-01-01 .. 2027-01-01)
    days: int = 60  # session starts fall on these days from `start`
    noise_share: float = 0.2  # chance that an event is a generic page (home, promotions, ...), not the intent's
    stray_share: float = 0.05  # chance that an event is a page of another of the visitor's intents
    mean_sessions: float = 4.0  # per visitor: 1 + Poisson(mean_sessions - 1)
    min_events: int = 3  # per session
    max_events: int = 25
    persona_concentration: float = 1.5  # Dirichlet alpha total: small = one or two intents per visitor
    min_session_gap_s: int = 3600  # a visitor's next session starts at least this long after the last ends

    def check(self) -> None:
        """Raise ClickstreamError naming the first bad value."""
        for name in ("visitors", "days", "min_events", "max_events", "min_session_gap_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ClickstreamError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.min_events > self.max_events:
            raise ClickstreamError(f"min_events ({self.min_events}) exceeds max_events ({self.max_events})")
        if not 0 <= self.noise_share < 1:
            raise ClickstreamError(f"noise_share must be in [0, 1), not {self.noise_share!r}")
        if not 0 <= self.stray_share < 1 - self.noise_share:
            raise ClickstreamError(f"stray_share must be in [0, 1 - noise_share), not {self.stray_share!r}")
        if self.mean_sessions < 1:
            raise ClickstreamError(f"mean_sessions must be at least 1, not {self.mean_sessions!r}")
        if self.persona_concentration <= 0:
            raise ClickstreamError(f"persona_concentration must be positive, not {self.persona_concentration!r}")
        if self.min_session_gap_s < 1800:
            raise ClickstreamError("min_session_gap_s must be at least 1800 (30 minutes): a shorter gap would "
                                   "merge sessions for a 30-minute inactivity cut")

    def as_json(self) -> dict:
        return {**asdict(self), "start": self.start.isoformat()}


@dataclass(frozen=True)
class Clickstream:
    """The generated tables, as written to the CSV files (clicks in visitor, then time order)."""

    config: ClickstreamConfig
    clicks: pd.DataFrame  # CLICKS_COLUMNS; ts as ISO text; query "" outside search events
    visitors: pd.DataFrame  # VISITORS_COLUMNS
    intents: pd.DataFrame  # INTENTS_COLUMNS: the planted intent of every session

    @property
    def noise_share(self) -> float:
        """Measured share of events drawn from the generic pages (not the session's intent)."""
        return float(self.clicks.attrs.get("noise_share", float("nan")))


@dataclass(frozen=True)
class ClickstreamResult:
    out_dir: Path
    config: ClickstreamConfig
    files: dict[str, Path]  # file name -> path
    n_visitors: int
    n_sessions: int
    n_events: int
    sessions_by_intent: dict[str, int] = field(default_factory=dict)
    noise_share: float = 0.0  # measured
    opened_share: float = 0.0  # visitors with opened_product = 1
    seconds: float = 0.0


def _table(pages: list[Page]) -> tuple[list[Page], np.ndarray]:
    w = np.array([p[2] for p in pages], dtype=float)
    return pages, w / w.sum()


_ALTERNATIVES = re.compile(r"\{([^{}]*)\}")


def _query(rng: np.random.Generator, templates: list[str]) -> str:
    template = templates[int(rng.integers(len(templates)))]
    text = _ALTERNATIVES.sub(lambda m: (alts := m.group(1).split("|"))[int(rng.integers(len(alts)))], template)
    if rng.random() < QUERY_SUFFIX_SHARE:
        text += QUERY_SUFFIXES[int(rng.integers(len(QUERY_SUFFIXES)))]
    return " ".join(text.split())


def _opened_probability(shopping: list[tuple[bool, bool]]) -> float:
    """P(opened a product) from the visitor's shopping sessions: (started an application, submitted it).

    A base 2%, then each shopping session adds its own chance: 65% with a submitted application,
    20% with one started, 2% otherwise (browsing alone rarely ends in an account).
    """
    p_none = 0.98
    for started, submitted in shopping:
        p_none *= 1 - (0.65 if submitted else 0.20 if started else 0.02)
    return 1 - p_none


def generate_clickstream(config: ClickstreamConfig = ClickstreamConfig()) -> Clickstream:
    """Draw the whole dataset in memory: a pure function of `config` (numpy PCG64 seeded by config.seed)."""
    config.check()
    rng = np.random.default_rng(config.seed)
    noise_pages, noise_p = _table(NOISE_PAGES)
    intent_tables = [_table(INTENT_PAGES[i]) for i in INTENTS]
    segments = list(SEGMENTS)
    segment_p = np.array([SEGMENTS[s][0] for s in segments])
    hour_p = np.array(HOUR_WEIGHTS, dtype=float) / sum(HOUR_WEIGHTS)
    window_s = config.days * 86400

    clicks: dict[str, list] = {c: [] for c in CLICKS_COLUMNS}
    visitors: dict[str, list] = {c: [] for c in VISITORS_COLUMNS}
    intents: dict[str, list] = {c: [] for c in INTENTS_COLUMNS}
    n_noise = 0
    session_no = 0
    for visitor in range(1, config.visitors + 1):
        segment = segments[int(rng.choice(len(segments), p=segment_p))]
        region = REGIONS[int(rng.choice(len(REGIONS), p=REGION_SHARES))]
        tilt = np.array(SEGMENTS[segment][1])
        persona = rng.dirichlet(config.persona_concentration * tilt / tilt.sum())
        propensity = rng.beta(1.2, 6.0)
        usual_device = int(rng.choice(len(DEVICES), p=DEVICE_SHARES))
        n_sessions = 1 + int(rng.poisson(config.mean_sessions - 1))
        starts = np.sort(rng.integers(0, config.days, n_sessions) * 86400
                         + rng.choice(24, size=n_sessions, p=hour_p) * 3600
                         + rng.integers(0, 3600, n_sessions))
        shopping: list[tuple[bool, bool]] = []
        last_end = None
        for start in starts:
            begin = int(start) if last_end is None else max(int(start), last_end + config.min_session_gap_s)
            if begin >= window_s:
                break  # pushed past the window by the visitor's earlier sessions (so are the later ones)
            intent = int(rng.choice(len(INTENTS), p=persona))
            name = INTENTS[intent]
            pages, page_p = intent_tables[intent]
            n = int(np.clip(round(rng.lognormal(np.log(SESSION_LENGTH[name]), 0.5)),
                            config.min_events, config.max_events))
            u = rng.random(n)
            is_noise = u < config.noise_share
            drawn_intent = rng.choice(len(pages), size=n, p=page_p)
            drawn_noise = rng.choice(len(noise_pages), size=n, p=noise_p)
            noise = is_noise.tolist()
            events = [(noise_pages[j] if noisy else pages[i])[:2] for noisy, i, j in
                      zip(noise, drawn_intent.tolist(), drawn_noise.tolist())]
            # Strays: a mortgage shopper checks a balance on the way; queries stay the session intent's.
            other = persona.copy()
            other[intent] = 0.0
            if other.sum() > 0:
                for k in np.flatnonzero((u >= config.noise_share) & (u < config.noise_share + config.stray_share)):
                    stray_pages, stray_p = intent_tables[int(rng.choice(len(INTENTS), p=other / other.sum()))]
                    events[k] = stray_pages[int(rng.choice(len(stray_pages), p=stray_p))][:2]
            if name == "account_servicing" and rng.random() < SERVICING_LOGIN_ENTRY:
                events[0], noise[0] = ("login", "login"), False
            started = submitted = False
            if name in APPLICATION_PAGES:
                if rng.random() < propensity:
                    options = APPLICATION_PAGES[name]
                    w = np.array([o[1] for o in options])
                    form = options[int(rng.choice(len(options), p=w / w.sum()))][0]
                    started, submitted = True, rng.random() < SUBMITTED_SHARE
                    tail = [("application", form)] + ([("application", f"{form}/submitted")] if submitted else [])
                    events[n - len(tail):] = tail
                    noise[n - len(tail):] = [False] * len(tail)
                shopping.append((started, submitted))
            device = usual_device if rng.random() < 0.8 else int(rng.choice([d for d in range(3) if d != usual_device]))
            median = np.array([PAGE_TYPES[t][0] for t, _ in events])
            sigma = np.array([PAGE_TYPES[t][1] for t, _ in events])
            dwell = np.round(np.clip(median * np.exp(sigma * rng.standard_normal(n)), 1.0, MAX_DWELL_S), 1)
            # The next click: after the dwell plus a moment (1 s plus a lognormal few seconds).
            gaps = np.ceil(dwell).astype(np.int64) + 1 + np.floor(rng.lognormal(np.log(2.0), 0.7, n)).astype(np.int64)
            offsets = begin + np.concatenate([[0], np.cumsum(gaps[:-1])])
            last_end = int(offsets[-1])
            session_no += 1
            session_id = f"s{session_no:06d}"
            queries = [(_query(rng, NOISE_QUERIES if noisy else QUERIES[name]) if t == "search" else "")
                       for (t, _), noisy in zip(events, noise)]
            clicks["visitor_id"] += [visitor] * n
            clicks["session_id"] += [session_id] * n
            clicks["ts"].append(offsets)
            clicks["page_type"] += [t for t, _ in events]
            clicks["page"] += [p for _, p in events]
            clicks["dwell_s"].append(dwell)
            clicks["query"] += queries
            clicks["device"] += [DEVICES[device]] * n
            intents["session_id"].append(session_id)
            intents["intent"].append(name)
            n_noise += sum(noise)
        visitors["visitor_id"].append(visitor)
        visitors["opened_product"].append(int(rng.random() < _opened_probability(shopping)))
        visitors["segment"].append(segment)
        visitors["region"].append(region)

    origin = np.datetime64(config.start.isoformat(), "s")
    seconds = np.concatenate(clicks["ts"]) if clicks["ts"] else np.zeros(0, dtype=np.int64)
    clicks["ts"] = np.datetime_as_string(origin + seconds.astype("timedelta64[s]"), unit="s")
    clicks["dwell_s"] = np.concatenate(clicks["dwell_s"]) if clicks["dwell_s"] else np.zeros(0)
    frame = pd.DataFrame(clicks, columns=CLICKS_COLUMNS)
    frame.attrs["noise_share"] = n_noise / len(frame) if len(frame) else 0.0
    return Clickstream(config, frame, pd.DataFrame(visitors, columns=VISITORS_COLUMNS),
                       pd.DataFrame(intents, columns=INTENTS_COLUMNS))


def write_clickstream(out_dir: Path, config: ClickstreamConfig = ClickstreamConfig()) -> ClickstreamResult:
    """Generate and write clicks.csv, visitors.csv, planted_intents.csv and README.txt into `out_dir`.

    Each file is written to a temporary name beside it, then renamed: a reader never sees half a file.
    """
    t0 = time.perf_counter()
    data = generate_clickstream(config)
    out_dir = _output_folder(out_dir)
    by_intent = data.intents["intent"].value_counts()
    sessions_by_intent = {i: int(by_intent.get(i, 0)) for i in INTENTS}
    result = ClickstreamResult(
        out_dir=out_dir, config=config, files={name: out_dir / name for name in FILES},
        n_visitors=len(data.visitors), n_sessions=len(data.intents), n_events=len(data.clicks),
        sessions_by_intent=sessions_by_intent, noise_share=data.noise_share,
        opened_share=float(data.visitors["opened_product"].mean()) if len(data.visitors) else 0.0,
    )
    csv = {"lineterminator": "\n", "index": False}
    _atomic_write(out_dir / "clicks.csv", lambda p: data.clicks.to_csv(p, float_format="%.1f", **csv))
    _atomic_write(out_dir / "visitors.csv", lambda p: data.visitors.to_csv(p, **csv))
    _atomic_write(out_dir / "planted_intents.csv", lambda p: data.intents.to_csv(p, **csv))
    _atomic_write(out_dir / "README.txt", lambda p: p.write_text(readme(result)))
    return ClickstreamResult(**{**result.__dict__, "seconds": time.perf_counter() - t0})


def _output_folder(out_dir: Path | str) -> Path:
    """`out_dir`, created if missing; a folder that cannot be made is a ClickstreamError naming it."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClickstreamError(f"{out_dir}: cannot create the output folder ({e.strerror})") from e
    return out_dir


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ClickstreamError(f"{path}: cannot write ({e.strerror})") from e


def readme(r: ClickstreamResult) -> str:
    """README.txt: what the files are and how they were drawn (no run times: the bytes must not vary)."""
    c = r.config
    intents = "\n".join(f"  {name:<23} {r.sessions_by_intent[name]:>7,} sessions  {text}"
                        for name, text in PLANTED_INTENTS.items())
    return f"""Synthetic bank-website clickstream with planted session intents (llm4es, generator v{GENERATOR_VERSION})

Generated by producers/synthetic/clickstream.py (`llm4es synth-clicks`; `llm4es ingest
bank-clickstream` without --source generates the default set) with
  {json.dumps(c.as_json(), sort_keys=True)}
The same settings write the same files byte for byte. Load them with
  llm4es ingest bank-clickstream --source <this folder>
  llm4es validate bank-clickstream

Size: {r.n_visitors:,} visitors, {r.n_sessions:,} sessions, {r.n_events:,} clicks; {r.noise_share:.1%} of the clicks
are generic (noise) pages; {r.opened_share:.1%} of the visitors opened a product.

Files (comma-separated, with a header):
  clicks.csv           one row per page view: visitor_id, session_id (globally unique, "s000123"),
                       ts (ISO time, seconds), page_type, page, dwell_s (seconds on the page),
                       query (search text, only where page_type is search), device
  visitors.csv         one row per visitor: visitor_id, opened_product (0/1, the label),
                       segment, region
  planted_intents.csv  session_id, intent: the ground truth of every session. The dataset
                       definition (bank-clickstream.yaml) does not read it; keep it aside to
                       score the intents a producer recovers.

Planted intents (sessions; what they browse):
{intents}

How it was drawn:
- each visitor has a segment and a region, a persona (a Dirichlet mix over the intents, tilted by
  the segment, concentrated on one or two of them), a propensity to apply, and a usual device;
- 1 + Poisson({c.mean_sessions:g} - 1) sessions, starting on random days of the {c.days}-day window at
  daytime-weighted hours, at least {c.min_session_gap_s} s after the visitor's previous session
  ends (a 30-minute inactivity cut finds the same sessions as session_id);
- each session draws one intent from the persona and {c.min_events}..{c.max_events} clicks; each click
  is a generic page (home, promotions, blog, find a branch, ...) with probability {c.noise_share:g},
  a page of another of the visitor's intents with probability {c.stray_share:g}, else a page of
  the session's intent. Pages such as login, help/credit-score and locations/find-branch
  belong to several intents, and every intent searches, so no single click gives the intent away;
- shopping sessions (mortgage, credit card, savings and investing, loan) end on the application
  form with the visitor's propensity, and {SUBMITTED_SHARE:.0%} of those on the submitted page;
- dwell_s is lognormal by page type (capped at {MAX_DWELL_S:g} s); the next click follows the dwell
  plus a few seconds;
- opened_product is 1 with probability 1 - 0.98 * prod(1 - q) over the visitor's shopping
  sessions, q = 0.65 with a submitted application, 0.20 with one started, 0.02 otherwise.
"""
