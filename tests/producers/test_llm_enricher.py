"""The `llm` enricher: the OpenAI-compatible back end against a fake server, the cache, the checks,
and the local back end with a tiny random model. All offline."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producers.datasets.definition import load_builtin
from producers.enrich.backends import GenerationError, OpenAIBackend, stable_seed
from producers.enrich.base import Rewrite, UserHistory
from producers.enrich.llm import (
    INSTRUCTION_LINES,
    MIN_LENGTH_RATIO,
    PROMPT,
    LLMEnricher,
    build_prompt,
    check_output,
    cut_history,
    data_coverage,
)
from producers.enrich.options import LLMOptions

HEADER = "Date | Title | Year | Genres | Rating"
DEFINITION = load_builtin("movielens-100k")


WORDS = ["Amber", "Breeze", "Cobalt", "Dune", "Ember", "Falcon", "Glacier", "Harbor", "Ivory", "Jasper", "Kestrel",
         "Lagoon"]
GENRES = ["Drama", "Comedy", "Horror"]


def history(user_id: int, n: int = 8) -> UserHistory:
    rows = [[f"1997-11-{d % 28 + 1:02d} 07:42", f"The {WORDS[d % len(WORDS)]} {user_id}", str(1980 + d % 20),
             GENRES[d % 3], str(d % 5 + 1)] for d in range(n)]
    lines = [", ".join(r) for r in rows]
    return UserHistory(user_id, ["time", "title", "year", "genres", "rating"], HEADER.split(" | "), rows,
                       "\n".join([HEADER, *lines]))


class StubFallback:
    name = "template"

    def __init__(self):
        self.calls = 0

    def rewrite(self, definition, histories, variant):
        self.calls += len(histories)
        return [Rewrite("FALLBACK", "json") for _ in histories]


def rewritten(user_text: str) -> str:
    """The fake server's canned rewrite: the data part of the prompt, shouted."""
    data = user_text.split("\n\n", 1)[1]
    return "# Rewrite\n" + data.upper()


# --------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server
# --------------------------------------------------------------------------------------------


class FakeServer:
    """`/v1/chat/completions` on 127.0.0.1 in a thread, with scripted misbehaviour.

    fail_first: the first N requests get HTTP 500; slow_first: the first N sleep `slow_s` before
    answering; a prompt containing `bad_marker` gets 400, one containing `broken_marker` gets 500,
    always. Every request sleeps `delay` s so concurrent ones overlap. Past `max_requests` every
    request gets 400 (a runaway retry loop cannot hang the test).
    """

    def __init__(self, fail_first=0, slow_first=0, slow_s=1.0, delay=0.0, bad_marker=None, broken_marker=None,
                 max_requests=200):
        self.fail_first, self.slow_first, self.slow_s, self.delay = fail_first, slow_first, slow_s, delay
        self.bad_marker, self.broken_marker, self.max_requests = bad_marker, broken_marker, max_requests
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str | None] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    server.paths.append(self.path)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self._answer(n, body)  # every path ends in _send, which counts the request out

            def _answer(self, n, body):
                user = body["messages"][-1]["content"]
                time.sleep(server.delay)
                if n >= server.max_requests or (server.bad_marker and server.bad_marker in user):
                    return self._send(400, {"error": "bad request"})
                if n < server.fail_first or (server.broken_marker and server.broken_marker in user):
                    return self._send(500, {"error": "internal"})
                if n < server.fail_first + server.slow_first:
                    time.sleep(server.slow_s)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": rewritten(user)}}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                # Out of flight before the answer leaves: once the client has it, it may send its next
                # request before this thread runs again, which would count one request too many.
                with server.lock:
                    server.in_flight -= 1
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_enricher(server, tmp_path, fallback=None, **options):
    opts = LLMOptions(backend="openai", model="fake-model", endpoint=server.endpoint, **options)
    backend = OpenAIBackend(opts, backoff_s=0.01)
    return LLMEnricher(opts, fallback=fallback or StubFallback(), home=None, schema="s", seed=7, backend=backend,
                       cache_path=tmp_path / "llm_cache.duckdb")


def test_concurrency_is_bounded_and_requests_carry_options(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    histories = [history(u) for u in range(12)]
    with FakeServer(delay=0.1) as server:
        enricher = openai_enricher(server, tmp_path, concurrency=3, temperature=0.5, top_p=0.9, max_new_tokens=77,
                                   api_key_env="FAKE_KEY")
        out = enricher.rewrite(DEFINITION, histories, variant=2)
    assert len(server.requests) == 12
    assert 2 <= server.max_in_flight <= 3
    assert [r.format for r in out] == ["llm"] * 12 and all(r.generated for r in out)
    assert {r.text for r in out} == {rewritten(r["messages"][-1]["content"]).strip() for r in server.requests}
    req = server.requests[0]
    assert (req["model"], req["temperature"], req["top_p"], req["max_tokens"]) == ("fake-model", 0.5, 0.9, 77)
    assert {r["seed"] for r in server.requests} == {stable_seed(7, u, 2) for u in range(12)}
    assert set(server.auth) == {"Bearer sekrit"}
    system, user = req["messages"]
    assert system["role"] == "system" and "structured list of movie ratings" in system["content"]
    assert user["content"].startswith("I have a list of movie ratings in a structured tabular format.")
    assert enricher.stats == {"generated": 12, "cached": 0, "fallbacks": 0, "refusals": {}}


def test_retries_500_and_timeouts_but_not_400(tmp_path):
    histories = [history(u) for u in range(4)] + [UserHistory(99, [], [], [], HEADER + "\nBADUSER, 1"),
                                                  UserHistory(98, [], [], [], HEADER + "\nBROKEN, 1")]
    fallback = StubFallback()
    with FakeServer(fail_first=2, slow_first=1, slow_s=1.5, bad_marker="BADUSER", broken_marker="BROKEN") as server:
        enricher = openai_enricher(server, tmp_path, fallback=fallback, concurrency=1, retries=3, timeout_s=0.4)
        out = enricher.rewrite(DEFINITION, histories, variant=0)
    users = [r["messages"][-1]["content"] for r in server.requests]
    per_user = {h.user_id: sum(h.serialized.split("\n", 1)[1] in u for u in users) for h in histories}
    # 2 x 500, 1 timeout, then the first user succeeds; 400 is not retried; a 500 for good is tried 1 + 3 times.
    assert per_user == {0: 4, 1: 1, 2: 1, 3: 1, 99: 1, 98: 4}
    assert [r.format for r in out] == ["llm"] * 4 + ["fallback:json"] * 2
    assert out[4].text == "FALLBACK" and fallback.calls == 2
    assert enricher.stats["fallbacks"] == 2 and enricher.stats["refusals"] == {"backend_error": 2}
    assert enricher.stats["generated"] == 4


def test_failed_request_names_the_endpoint(tmp_path):
    opts = LLMOptions(backend="openai", model="m", endpoint="http://127.0.0.1:9/v1", retries=1, timeout_s=1)
    [err] = OpenAIBackend(opts, backoff_s=0.01).generate([[{"role": "user", "content": "hi"}]], [1])
    assert isinstance(err, GenerationError)
    assert "http://127.0.0.1:9/v1/chat/completions" in str(err) and "2 attempt(s)" in str(err)


def test_endpoint_credentials_are_used_but_never_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeServer(fail_first=10**6, max_requests=10**6) as server:
        port = server.endpoint.split(":")[-1].split("/")[0]
        endpoint = f"http://bob:hunter2@127.0.0.1:{port}/key-sk-SECRET42/v1?api_key=SECRET43"
        logs = []
        opts = LLMOptions(backend="openai", model="m", endpoint=endpoint, retries=1, timeout_s=5)
        backend = OpenAIBackend(opts, backoff_s=0.01, log=logs.append)
        [err] = backend.generate([[{"role": "user", "content": "hi"}]], [1])
        enricher = LLMEnricher(opts, fallback=StubFallback(), home=None, schema="s", backend=backend,
                               cache_path=tmp_path / "c.duckdb", log=logs.append)
        enricher.rewrite(DEFINITION, [history(1)], 0)
    # The request went where the URL says, with user:password as Basic authentication.
    assert server.paths[0] == "/key-sk-SECRET42/v1/chat/completions?api_key=SECRET43"
    assert server.auth[0] == "Basic Ym9iOmh1bnRlcjI="  # bob:hunter2
    shown = f"http://***@127.0.0.1:{port}/***/v1/chat/completions?api_key=***"
    assert str(err).startswith(f"{shown}: all 2 attempt(s) failed; last: HTTP 500")
    assert enricher.first_error.startswith(shown)
    for line in [str(err), *logs]:
        assert "SECRET4" not in line and "hunter2" not in line
    assert any(line.startswith(f"openai backend: {shown}") for line in logs)


def test_default_timeouts_are_bounded_and_printed():
    from producers.enrich.backends import describe_timeouts, worst_case_s

    opts = LLMOptions()
    assert (opts.timeout_s, opts.retries) == (30.0, 2)
    assert worst_case_s(opts) == 3 * 30 + 1 + 2  # three attempts, backoffs of 1 and 2 s
    assert describe_timeouts(opts) == ("timeout 30 s x 3 attempt(s) with backoff: at most 93 s per request on an "
                                       "unresponsive endpoint (--timeout, --retries)")


def test_backend_errors_are_not_cached(tmp_path):
    h = [UserHistory(98, [], [], [], HEADER + "\nBROKEN, 1")]
    with FakeServer(broken_marker="BROKEN") as server:
        openai_enricher(server, tmp_path, retries=0).rewrite(DEFINITION, h, 0)
        openai_enricher(server, tmp_path, retries=0).rewrite(DEFINITION, h, 0)
    assert len(server.requests) == 2  # asked again on the second run


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def test_second_run_is_all_cached(tmp_path):
    histories = [history(u) for u in range(6)]
    with FakeServer() as server:
        first = openai_enricher(server, tmp_path, concurrency=2)
        a = [first.rewrite(DEFINITION, histories, v) for v in range(2)]
        assert len(server.requests) == 12
        second = openai_enricher(server, tmp_path, concurrency=2)
        b = [second.rewrite(DEFINITION, histories, v) for v in range(2)]
        assert len(server.requests) == 12
    assert [[r.text for r in v] for v in a] == [[r.text for r in v] for v in b]
    assert all(r.generated for v in a for r in v) and not any(r.generated for v in b for r in v)
    assert second.stats == {"generated": 0, "cached": 12, "fallbacks": 0, "refusals": {}}
    # A changed history (another prompt) is generated again.
    changed = [history(0, n=9), *histories[1:]]
    with FakeServer() as server:
        third = openai_enricher(server, tmp_path)
        third.rewrite(DEFINITION, changed, 0)
    assert len(server.requests) == 1 and third.stats["cached"] == 5


class ScriptedBackend:
    """Answers with canned rewrites; raises on call number `die_on` (a killed run)."""

    name = "fake"

    def __init__(self, batch_size=2, die_on=None):
        self.batch_size, self.die_on, self.calls, self.prompts = batch_size, die_on, 0, 0

    def prompt_tokenizer(self):
        return None

    def generate(self, prompts, seeds):
        self.calls += 1
        if self.calls == self.die_on:
            raise KeyboardInterrupt("killed")
        self.prompts += len(prompts)
        return [rewritten(p[-1]["content"]) for p in prompts]


def test_killed_run_resumes(tmp_path):
    histories = [history(u) for u in range(7)]

    def make(backend):
        return LLMEnricher(LLMOptions(model="fake"), fallback=StubFallback(), home=None, schema="s",
                           backend=backend, cache_path=tmp_path / "c.duckdb")

    dying = ScriptedBackend(batch_size=2, die_on=2)
    with pytest.raises(KeyboardInterrupt):
        make(dying).rewrite(DEFINITION, histories, 0)
    assert dying.prompts == 2  # the first batch was done, and cached
    resumed_backend = ScriptedBackend(batch_size=2)
    resumed = make(resumed_backend)
    out = resumed.rewrite(DEFINITION, histories, 0)
    assert resumed_backend.prompts == 5
    assert resumed.stats["generated"] == 5 and resumed.stats["cached"] == 2
    assert [r.generated for r in out] == [False] * 2 + [True] * 5
    assert all(r.format == "llm" for r in out)


def test_cache_home_location(tmp_path):
    from producers.stores.warehouse import Home

    home = Home.resolve(tmp_path)
    enricher = LLMEnricher(LLMOptions(model="fake"), fallback=StubFallback(), home=home, schema="movielens_100k",
                           backend=ScriptedBackend())
    enricher.rewrite(DEFINITION, [history(1)], 0)
    assert (tmp_path / "data" / "movielens_100k" / "llm_cache.duckdb").is_file()


# --------------------------------------------------------------------------------------------
# Prompt and checks
# --------------------------------------------------------------------------------------------


def test_prompt_cut_keeps_header_and_recent_lines():
    h = history(1, n=200)
    cut = cut_history(h.serialized, None, max_tokens=100)
    lines = cut.split("\n")
    assert lines[0] == HEADER and lines[-1] == h.serialized.split("\n")[-1]
    assert 1 < len(lines) < 201 and len(cut) <= 300
    from tests.fixtures.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer()
    cut = cut_history(h.serialized, tok, max_tokens=300)
    assert cut.startswith(HEADER + "\n") and cut.endswith(h.serialized.split("\n")[-1])
    assert len(tok(cut)["input_ids"]) <= 300
    p = build_prompt(DEFINITION, h, tok, 300)
    assert p.messages[1]["content"].endswith("\n\n" + cut) and p.data == cut
    assert build_prompt(DEFINITION, h, tok, 300).hash == p.hash != build_prompt(DEFINITION, h, tok, 200).hash
    assert PROMPT["version"]


def test_checks_refuse_with_reasons():
    data = history(1, n=10).serialized
    good = "\n".join(f"- {line.upper()}" for line in data.split("\n"))
    assert check_output(good, data) is None
    assert check_output("", data) == "empty"
    assert check_output("  \n\t", data) == "empty"
    assert check_output("Here it is:\n" + data + "\nDone.", data) == "echo_input"
    lines = data.split("\n")
    assert check_output("\n".join(lines[:8] + ["my own words"]), data) is None  # 8/9 = 89% copied: passes
    assert check_output("\n".join(lines[:10] + ["my own words"]), data) == "echo_input"  # 10/11 = 91%
    assert check_output("Sure, what format would you like?", data) == "too_short"
    assert check_output("x" * int(MIN_LENGTH_RATIO * len(data) + 1), data) == "low_coverage"
    # Distinct words of the 10 lines: 1997, the, 10 title words, 10 years, 3 genres = 25.
    titles = ", ".join(f"The {w}" for w in WORDS[:10])  # 11 of 25 words (44%): passes
    assert data_coverage(titles, data) == pytest.approx(11 / 25)
    assert check_output(f"She rated ten films: {titles}.", data) is None
    five = "\n".join(f"* The {w}: 5 stars" for w in WORDS[:5])  # 6 of 25 (24%): not a rewrite of this history
    assert check_output("# Ratings (made up)\n" + five + "\n" + "* Something Else: 1 star\n" * 4, data) == \
        "low_coverage"
    assert check_output("To transform this data, use Python's json module and write a CSV file. " * 3, data) == \
        "low_coverage"
    assert check_output("y" * (4 * len(data) + 2001), data) == "too_long"
    instructions = sorted(INSTRUCTION_LINES)
    assert check_output("\n".join(instructions[:2]) + "\n" + good, data) == "echo_prompt"


def test_refused_outputs_fall_back(tmp_path):
    class Junk(ScriptedBackend):
        def generate(self, prompts, seeds):
            data = [p[-1]["content"].split("\n\n", 1)[1] for p in prompts]
            return ["", data[1], "ok?", "# Rewrite\n" + data[3].upper()]

    fallback = StubFallback()
    enricher = LLMEnricher(LLMOptions(model="fake"), fallback=fallback, home=None, schema="s",
                           backend=Junk(batch_size=4), cache_path=tmp_path / "c.duckdb")
    out = enricher.rewrite(DEFINITION, [history(u) for u in range(4)], 0)
    assert [r.format for r in out] == ["fallback:json"] * 3 + ["llm"]
    assert enricher.stats["refusals"] == {"empty": 1, "echo_input": 1, "too_short": 1}
    assert enricher.stats["fallbacks"] == 3 and enricher.stats["generated"] == 4
    import duckdb

    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    statuses = dict(con.execute("SELECT user_id, status FROM llm_cache").fetchall())
    con.close()
    assert statuses == {"0": "refused:empty", "1": "refused:echo_input", "2": "refused:too_short", "3": "ok"}


# --------------------------------------------------------------------------------------------
# The local back end
# --------------------------------------------------------------------------------------------


def test_local_backend_with_tiny_model(tmp_path):
    from tests.fixtures.tiny_model import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny", max_positions=2048)
    opts = LLMOptions(backend="local", model=str(folder), max_new_tokens=8, max_input_tokens=512, batch_size=2)
    fallback = StubFallback()
    enricher = LLMEnricher(opts, fallback=fallback, home=None, schema="s", backend=None,
                           cache_path=tmp_path / "c.duckdb")
    t0 = time.perf_counter()
    out = enricher.rewrite(DEFINITION, [history(1), history(2)], 0)
    assert time.perf_counter() - t0 < 30
    assert enricher.stats["generated"] == 2
    # Eight random tokens are far shorter than 20% of the history: both refused, both fall back.
    assert enricher.stats["fallbacks"] == 2 and fallback.calls == 2
    assert enricher.stats["refusals"] == {"too_short": 2}
    assert [r.format for r in out] == ["fallback:json"] * 2
    import duckdb

    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    outputs = con.execute("SELECT output, backend, max_new_tokens FROM llm_cache").fetchall()
    con.close()
    assert len(outputs) == 2 and all(b == "local" and m == 8 for _, b, m in outputs)


def test_cached_outputs_are_checked_again(tmp_path):
    import duckdb

    path = tmp_path / "c.duckdb"

    def make():
        return LLMEnricher(LLMOptions(model="fake"), fallback=StubFallback(), home=None, schema="s",
                           backend=ScriptedBackend(), cache_path=path)

    make().rewrite(DEFINITION, [history(1), history(2)], 0)
    con = duckdb.connect(str(path))
    con.execute("UPDATE llm_cache SET status = 'refused:old_rule' WHERE user_id = '1'")
    con.execute("UPDATE llm_cache SET output = 'no' WHERE user_id = '2'")  # as if the checks had been looser
    con.close()
    again = make()
    out = again.rewrite(DEFINITION, [history(1), history(2)], 0)
    assert [r.format for r in out] == ["llm", "fallback:json"]
    assert again.stats == {"generated": 0, "cached": 2, "fallbacks": 1, "refusals": {"too_short": 1}}
    con = duckdb.connect(str(path), read_only=True)
    statuses = dict(con.execute("SELECT user_id, status FROM llm_cache").fetchall())
    assert statuses == {"1": "ok", "2": "refused:too_short"}
    con.close()


def test_fallback_share_threshold():
    from producers.enrich.base import EnrichError, EnrichReport
    from producers.enrich.run import refuse_fallbacks

    report = EnrichReport("d", "llm", users=10, variants=2, fallbacks=2, refusals={"too_short": 2})
    refuse_fallbacks(report, 0.1)  # 2 of 20 = 10%: at the threshold, accepted
    report.fallbacks = 3
    with pytest.raises(EnrichError, match=r"3 of 20 llm texts \(15%\) would be template fallbacks.*too_short 2"):
        refuse_fallbacks(report, 0.1)
    refuse_fallbacks(report, 1.0)
    refuse_fallbacks(EnrichReport("d", "template", 10, 2, fallbacks=20), 0.0)  # templates never fall back


@pytest.mark.parametrize("capability, dtype", [((7, 5), "float16"), ((9, 0), "bfloat16")])
def test_local_backend_loads_bf16_only_on_a_gpu_that_has_it(monkeypatch, capability, dtype):
    """A T4 (7.5) only emulates bf16: the local LLM generates in float16 there, in bf16 on an H100 (9.0)."""
    import torch

    from producers.enrich.backends import LocalBackend
    from producers.shared import models

    loaded = {}

    class Model:
        def to(self, device):
            loaded["device"] = device
            return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    def load_causal_lm(path, dtype):
        loaded["dtype"] = dtype
        return Model()

    monkeypatch.setattr(models, "load_causal_lm", load_causal_lm)
    backend = LocalBackend(LLMOptions(backend="local", model="/some/model"))
    backend._path = "/some/model"
    backend._load()
    assert loaded["dtype"] == getattr(torch, dtype) and loaded["device"].type == "cuda"
