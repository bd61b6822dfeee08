"""The cross-channel synthetic bank: deterministic, the web side the plain generator's, linkage as configured."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from producers.synthetic.clickstream import ClickstreamConfig, ClickstreamError, generate_clickstream
from producers.synthetic.crosschannel import (
    ANON_BASE,
    TILES,
    CrossChannelConfig,
    generate_crosschannel,
    write_crosschannel,
)

SMALL = CrossChannelConfig(web=ClickstreamConfig(visitors=300, seed=5), app_user_share=0.6, link_share=0.5)


@pytest.fixture(scope="module")
def data():
    return generate_crosschannel(SMALL)


def test_same_config_same_bytes_other_seed_other_data(tmp_path, data):
    a, b = tmp_path / "a", tmp_path / "b"
    write_crosschannel(a, SMALL)
    write_crosschannel(b, SMALL)
    for name in ("clicks.csv", "visitors.csv", "app_visits.csv", "app_tiles.csv", "openings.csv", "links.csv",
                 "README.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = generate_crosschannel(CrossChannelConfig(web=ClickstreamConfig(visitors=300, seed=6)))
    assert not other.app_visits["ts"].equals(data.app_visits["ts"])


def test_web_side_is_the_plain_generators_rekeyed(data):
    plain = generate_clickstream(SMALL.web)
    key = ["session_id", "ts", "page", "dwell_s", "query", "device"]
    left = data.web.clicks.sort_values(["session_id", "ts"]).reset_index(drop=True)
    right = plain.clicks.sort_values(["session_id", "ts"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(left[key], right[key])
    assert data.web.intents.equals(plain.intents)


def test_linkage(data):
    links, clicks = data.links, data.web.clicks
    app_users = set(data.app_visits["user_id"])
    linked = links[links["user_id"].notna()]
    # Only app users are ever linked, and a linked session carries the person's customer id.
    assert set(linked["person_id"]) <= app_users
    assert (linked["user_id"].astype(int) == linked["person_id"]).all()
    of_app = links[links["person_id"].isin(app_users)]
    share = len(linked) / len(of_app)
    assert 0.4 < share < 0.6  # link_share 0.5
    owner = clicks.groupby("session_id")["visitor_id"].agg(["first", "nunique"])
    assert (owner["nunique"] == 1).all()
    ids = owner["first"].reindex(links["session_id"]).to_numpy()
    is_linked = links["user_id"].notna().to_numpy()
    assert (ids[is_linked] == links["person_id"].to_numpy()[is_linked]).all()
    anon = ids[~is_linked]
    assert (anon >= ANON_BASE).all() and len(set(anon)) == len(anon)  # one anonymous id per session
    # Every visitor id in clicks has its visitors.csv row (the dataset definition requires it).
    assert set(clicks["visitor_id"]) == set(data.web.visitors["visitor_id"])


def test_app_visits_tiles_and_conversions(data):
    v, t = data.app_visits, data.app_tiles
    assert (t.groupby("visit_id").size() == SMALL.tiles_shown).all()
    assert (t.groupby("visit_id")["clicked"].sum() <= 1).all()
    assert set(t["tile"]) <= set(TILES)
    clicked = t[t["clicked"] == 1].set_index("visit_id")["tile"]
    assert v.set_index("visit_id")["clicked_tile"].replace("", np.nan).dropna().sort_index().equals(
        clicked.sort_index().rename("clicked_tile"))
    # A conversion is an opening of that product by the user within N days after the visit.
    o = data.openings.assign(ts=pd.to_datetime(data.openings["ts"]))
    for _, row in v[v["converted_product"] != "none"].head(30).iterrows():
        t0 = pd.Timestamp(row["ts"])
        mine = o[(o["user_id"] == row["user_id"]) & (o["ts"] > t0) &
                 (o["ts"] <= t0 + pd.Timedelta(days=SMALL.conversion_days))]
        assert mine.iloc[0]["product"] == row["converted_product"]


def test_recent_web_intent_moves_the_click(data):
    """The planted signal: users whose latest web session was mortgage shopping click the mortgage tile more."""
    s = data.links.merge(data.web.intents, on="session_id")
    s["end"] = pd.to_datetime(s["session_end"])
    v = data.app_visits.assign(ts=pd.to_datetime(data.app_visits["ts"]))
    shown = data.app_tiles[data.app_tiles["tile"] == "mortgage"]
    v = v[v["visit_id"].isin(shown["visit_id"])]
    last = pd.merge_asof(v.sort_values("ts"), s.sort_values("end")[["person_id", "end", "intent"]],
                         left_on="ts", right_on="end", left_by="user_id", right_by="person_id")
    recent = last["end"] > last["ts"] - pd.Timedelta(days=3)
    mortgage = last["clicked_tile"] == "mortgage"
    after_mortgage = mortgage[recent & (last["intent"] == "mortgage_shopping")].mean()
    otherwise = mortgage[~(recent & (last["intent"] == "mortgage_shopping"))].mean()
    assert after_mortgage > otherwise + 0.15, (after_mortgage, otherwise)


def test_bad_values_are_named():
    with pytest.raises(ClickstreamError, match="link_share"):
        CrossChannelConfig(link_share=1.5).check()
    with pytest.raises(ClickstreamError, match="tiles_shown"):
        CrossChannelConfig(tiles_shown=9).check()
