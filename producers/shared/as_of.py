"""The point in time a snapshot of features is computed as of, and the check that it has come.

A stage that picks an as-of (aggregate, CoLES) takes the one asked for, else the dataset's last
event. A time in the future is refused: a feature store serves the newest snapshot, so a row
stamped 2099 would shadow every real one and online reads would return nothing useful. Event
times are naive UTC in the warehouse; `FUTURE_SLACK` allows for clocks and time zones.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

FUTURE_SLACK = timedelta(days=1)


def utc_naive(t: datetime) -> datetime:
    """Event times are naive UTC in the warehouse: compare with a naive UTC as_of."""
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t.tzinfo is not None else t


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def pick_as_of(dataset: str, requested: datetime | None, first: datetime | None, last: datetime | None,
               error: type[Exception], now: datetime | None = None) -> datetime:
    """`requested` (else the last event), refused with `error` when there are no events before it or it is in
    the future."""
    if last is None:
        raise error(f"{dataset} has no events")
    as_of = utc_naive(requested) if requested is not None else last
    now = now or utc_now()
    if as_of > now + FUTURE_SLACK:
        if requested is None:
            raise error(f"{dataset}: the last event is dated {last:%Y-%m-%d %H:%M:%S}, in the future (now is "
                        f"{now:%Y-%m-%d %H:%M} UTC), so it cannot be the as-of time: features stamped then would "
                        "shadow every real snapshot in the feature store. Fix the event times (validation's time "
                        "window reports the rows) or pass --as-of with a time that has passed")
        raise error(f"{dataset}: --as-of {as_of:%Y-%m-%d %H:%M:%S} is in the future (now is {now:%Y-%m-%d %H:%M} "
                    "UTC); give a time that has passed")
    if first is None or as_of < first:
        raise error(f"{dataset}: no events at or before {as_of} (events run from {first} to {last})")
    return as_of
