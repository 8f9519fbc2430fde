"""The dashboard's JSON builders and its authentication, without sockets (Starlette's in-process client)."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import pytest
from starlette.testclient import TestClient

from gateway.control.auth import Authenticator, parse_tokens
from gateway.dashboard.app import COOKIE, MAX_SESSIONS, SESSION_S, Sessions, build_app
from gateway.dashboard.data import History, Json, Sources, sample, version_json
from gateway.release.evidence import VersionReport

pytestmark = pytest.mark.unit

READ = "viewer-secret-0123456789"
WRITE = "deploy-secret-0123456789"


def snapshot(model: str, now: float, step: int = 1, checks: list[Json] | None = None) -> Json:
    return {
        "model": model,
        "at": now,
        "stable": "1",
        "canary": "2",
        "weight_pct": 10.0,
        "shadows": {},
        "phase": "progressing",
        "step": step,
        "candidate": "2",
        "next": "hold",
        "reason": "inconclusive",
        "checks": checks or [],
        "versions": [
            {
                "version": "1",
                "role": "stable",
                "requests": 5,
                "errors": 0,
                "error_rate": 0.0,
                "p50_ms": 1.0,
                "p99_ms": 2.0,
                "labelled": 3,
                "accuracy": 1.0,
                "accuracy_low": 0.4,
                "accuracy_high": 1.0,
                "compared_rows": 0,
                "agreement": None,
            }
        ],
        "alerts": [],
    }


class Made:
    """Made-up snapshots for the history: models can come and go, steps move."""

    def __init__(self, models: list[str]) -> None:
        self.names = models
        self.step = 1

    def models(self) -> list[str]:
        return list(self.names)

    def snapshot(self, model: str, now: float) -> Json:
        check = {"check": "accuracy", "verdict": "inconclusive", "value": -0.01, "low": -0.05, "high": 0.03}
        return snapshot(model, now, self.step, [check | {"bound": -0.02, "samples": 40, "needed": 100}])


def report(**changes: Any) -> VersionReport:
    base: dict[str, Any] = dict(
        version="2", role="canary", requests=0, errors=0, error_rate=0.0, p50_ms=0.0, p99_ms=0.0, labelled=0,
        accuracy=math.nan, accuracy_low=math.nan, accuracy_high=math.nan, mean_abs_error=math.nan, compared_rows=0,
        agreement=math.nan, within_tolerance=math.nan, max_abs_diff=math.nan, mean_abs_diff=math.nan,
        relative_l2=math.nan, latency_diff_ms=math.nan, rows=0,
    )  # fmt: skip
    return VersionReport(**(base | changes))


def test_a_version_without_requests_or_labels_has_null_figures_not_zero_or_nan() -> None:
    figures = version_json(report())
    assert figures["p50_ms"] is None and figures["p99_ms"] is None and figures["error_rate"] is None
    assert figures["accuracy"] is None and figures["agreement"] is None
    served = version_json(report(requests=10, p50_ms=1.5, p99_ms=4.0, labelled=8, accuracy=0.75, compared_rows=4,
                                 agreement=0.5, accuracy_low=0.4, accuracy_high=0.9))  # fmt: skip
    assert (served["p50_ms"], served["p99_ms"], served["accuracy"], served["agreement"]) == (1.5, 4.0, 0.75, 0.5)
    assert (served["accuracy_low"], served["accuracy_high"], served["labelled"]) == (0.4, 0.9, 8)


def test_a_sample_keeps_each_check_and_each_versions_figures() -> None:
    point = sample(Made(["digits"]).snapshot("digits", 100.0))
    assert point["t"] == 100.0 and point["step"] == 1 and point["weight_pct"] == 10.0
    assert point["checks"]["accuracy"] == {
        "value": -0.01, "low": -0.05, "high": 0.03, "bound": -0.02, "verdict": "inconclusive", "samples": 40,
    }  # fmt: skip
    assert point["versions"]["1"]["p99_ms"] == 2.0 and point["versions"]["1"]["labelled"] == 3


def test_the_history_numbers_samples_answers_what_a_page_has_not_seen_and_forgets_unloaded_models() -> None:
    made = Made(["digits", "iris"])
    history = History(made, limit=3)
    history.take(1.0)
    made.step = 2
    history.take(2.0)
    everything = history.since("digits", 0)
    assert [p["step"] for p in everything] == [1, 2]
    last = everything[-1]["seq"]
    assert history.since("digits", last) == []
    history.take(3.0)
    assert [p["t"] for p in history.since("digits", last)] == [3.0]
    history.take(4.0)
    assert [p["t"] for p in history.since("digits", 0)] == [2.0, 3.0, 4.0]  # a ring of `limit`
    made.names = ["digits"]
    history.take(5.0)
    assert history.since("iris", 0) == []


def client(tokens: str | None) -> TestClient:
    made = Made(["digits"])
    identify = Authenticator(parse_tokens(tokens, "test")).identify if tokens else None
    # The pages and the login never reach Sources; the API's model route is tested on a real gateway.
    app = build_app(cast(Sources, made), History(made), identify)
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)


def test_without_a_token_pages_answer_the_login_form_and_the_api_401_with_no_data() -> None:
    web = client(f"viewer:read:{READ},deploy:write:{WRITE}")
    for path in ("/", "/models/digits"):
        page = web.get(path)
        assert page.status_code == 401 and 'name="token"' in page.text and "digits" not in page.text.split("<main")[1]
    for path in ("/api/overview", "/api/models/digits"):
        answer = web.get(path)
        assert answer.status_code == 401 and set(answer.json()) == {"error"}
        assert web.get(path, headers={"authorization": "Bearer not-a-token-at-all"}).status_code == 401
        web.cookies.set(COOKIE, "not-a-token-at-all")
        assert web.get(path).status_code == 401
        web.cookies.clear()


def test_a_read_or_write_token_opens_the_pages_by_header_or_by_the_login_forms_cookie() -> None:
    web = client(f"viewer:read:{READ},deploy:write:{WRITE}")
    assert web.get("/", headers={"authorization": f"Bearer {WRITE}"}).status_code == 200
    refused = web.post("/login", data={"token": "wrong-token-0123456789"})
    assert refused.status_code == 401 and COOKIE not in refused.cookies and "not known" in refused.text
    login = web.post("/login?next=/models/digits", data={"token": READ})
    assert login.status_code == 303 and login.headers["location"] == "/models/digits"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    # The cookie holds a session, never the token.
    session = login.cookies[COOKIE]
    assert READ not in cookie and len(session) >= 40
    web.cookies.set(COOKIE, session)
    page = web.get("/models/digits")
    assert page.status_code == 200 and "model.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert web.post("/logout").headers["set-cookie"].startswith(f'{COOKIE}="";')
    # Logged out, the session is gone from the server too: a kept copy of the cookie is refused.
    web.cookies.set(COOKIE, session)
    assert web.get("/api/overview").status_code == 401
    # And a token put in the cookie by hand is not a session.
    web.cookies.set(COOKIE, READ)
    assert web.get("/api/overview").status_code == 401


def test_sessions_end_after_their_time_and_the_oldest_goes_past_the_cap() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0])
    first = sessions.start(READ)
    assert sessions.token(first) == READ and sessions.token("made-up") is None
    now[0] = SESSION_S - 1
    assert sessions.token(first) == READ
    now[0] = SESSION_S
    assert sessions.token(first) is None
    kept = [sessions.start(WRITE) for _ in range(MAX_SESSIONS)]
    newest = sessions.start(READ)
    assert sessions.token(kept[0]) is None and sessions.token(kept[1]) == WRITE and sessions.token(newest) == READ


@pytest.mark.parametrize("target", ["https://elsewhere.example/", "//elsewhere.example/", "/\\elsewhere", "models"])
def test_the_login_never_sends_the_browser_to_another_site(target: str) -> None:
    web = client(f"viewer:read:{READ}")
    login = web.post("/login", params={"next": target}, data={"token": READ})
    assert login.status_code == 303 and login.headers["location"] == "/"


def test_without_tokens_only_a_loopback_host_name_is_answered() -> None:
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    # Host: evil.example; an open (token-less) dashboard must not answer it.
    web = client(None)
    for path in ("/", "/api/overview"):
        assert web.get(path, headers={"host": "evil.example:8004"}).status_code == 400
        assert web.get(path, headers={"host": "localhost:8004"}).status_code == 200
    # With tokens the token is the guard: any host name the operator serves it under works.
    assert client(f"viewer:read:{READ}").get("/", headers={"host": "gateway.internal"}).status_code == 401


def test_without_tokens_everything_is_open_and_the_static_files_are_served() -> None:
    web = client(None)
    assert web.get("/").status_code == 200
    assert [m["model"] for m in web.get("/api/overview").json()["models"]] == ["digits"]
    script = web.get("/static/vendor/uPlot.iife.min.js")
    assert script.status_code == 200 and script.text.startswith("/*! https://github.com/leeoniya/uPlot")
    assert web.get("/static/../app.py").status_code == 404


def test_the_history_keeps_sampling_after_a_sample_fails() -> None:
    # The sampling task used to die on the first error (a store hiccup, say), freezing every chart.
    class Flaky(Made):
        failures = 2

        def snapshot(self, model: str, now: float) -> Json:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("store unavailable")
            return super().snapshot(model, now)

    history = History(Flaky(["digits"]))

    async def sample_a_while() -> None:
        task = asyncio.create_task(history.run(interval_s=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(sample_a_while())
    assert len(history.since("digits", 0)) >= 3
