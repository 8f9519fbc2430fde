"""The dashboard in a real headless Chromium, on a real gateway rolling out under labelled traffic.

Debian's chromium (installed by .ci/run) is driven by Playwright, launched by its path:
Playwright's own browser download is never used. One gateway with tokens: a page without
one gets the login form and no data; logged in with the read token, the model page follows
a rollout of digits v2 (promoted step by step) and then v3 (rolled back) without a reload,
its charts gaining points, and the audit trail shows the rollback with its checks. Each page
is saved as a screenshot under test-artifacts/ (and, with DASHBOARD_DOCS_SCREENSHOT=1,
docs/images/dashboard.png for the README).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

# The test extra installs Playwright: imported plainly, so a missing one fails, never skips.
import playwright.sync_api as playwright_api
import pytest

from gateway.cli.demo import DEMO_POLICY
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS, ROOT, gateway_process
from tests.traffic import Load, digits_builder

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
READ = "viewer-token-0123456789abcdef"
WRITE = "deploy-token-0123456789abcdef"
TOKENS = f"viewer:read:{READ},deploy:write:{WRITE}"
WRITER = (("authorization", f"Bearer {WRITE}"),)
ARTIFACTS = ROOT / "test-artifacts"
# `gateway demo`'s quick policy, deciding twice as often: v2 (more accurate) is promoted
# through 10, 25, 50 %, v3 (deliberately worse) is rolled back on accuracy, each within a minute.
POLICY = DEMO_POLICY.replace("interval_s = 1.0", "interval_s = 0.5")
assert POLICY != DEMO_POLICY, "gateway demo's policy no longer says interval_s = 1.0"


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):  # CI must run them: .ci/run installs it
            pytest.fail(f"no chromium at {CHROMIUM}")
        pytest.skip("no chromium (Debian's package; .ci/run installs it)")
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def screenshot(page: object, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # test output, never committed
    shutil.copy(path, ARTIFACTS / name)
    return path


def wait_phase(control: rgrpc.ReleaseServiceStub, phase: str, timeout: float) -> rpb.Release:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        release = control.GetRelease(rpb.GetReleaseRequest(model="digits"), timeout=10, metadata=WRITER)
        if release.phase == phase:
            return release
        time.sleep(0.3)
    raise AssertionError(f"digits did not reach {phase} in {timeout:g} s")


def test_the_dashboard_follows_a_rollout_live_and_refuses_a_browser_without_a_token(
    tmp_path: Path, browser: object
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", repo / "digits")
    spec = repo / "digits" / "model.toml"
    spec.write_text(spec.read_text() + POLICY)
    args = ("--models", str(repo), "--workers", "1", "--dashboard-port", "0")
    with gateway_process(*args, env={"GATEWAY_CONTROL_TOKENS": TOKENS}) as server:
        url = server.dashboard
        assert url.startswith("http://127.0.0.1:"), server.lines
        control = rgrpc.ReleaseServiceStub(grpc.insecure_channel(server.control))

        # Without a token: the login form, no data; the JSON is refused too.
        stranger = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
        page = stranger.new_page()
        response = page.goto(url + "models/digits")
        assert response.status == 401
        assert page.locator("input[name=token]").is_visible()
        assert page.locator("#model").count() == 0 and "stable" not in page.content()
        assert page.request.get(url + "api/models/digits").status == 401
        screenshot(page, tmp_path, "dashboard-login.png")
        page.fill("input[name=token]", "not-the-token-0123456789")
        page.click("button[type=submit]")
        assert page.locator("input[name=token]").is_visible()  # still the form, saying why
        assert "not known" in page.locator(".error").inner_text()
        stranger.close()

        context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
        page = context.new_page()
        page.goto(url + "models/digits")
        page.fill("input[name=token]", READ)
        page.click("button[type=submit]")
        page.wait_for_url(url + "models/digits")
        # Listened to from here: the login form itself came with a 401, which Chromium logs as an error.
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.wait_for_selector("#model[data-phase=idle]")
        # Set once: were the page reloaded, it would be gone.
        page.evaluate("window.__stayed = true")

        build = digits_builder(rows=16)
        with Load(server.address, server.control, "digits", build, clients=2, label_delay_s=0.5, metadata=WRITER):
            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="2", reason="browser test: v2"),
                                 timeout=10, metadata=WRITER)  # fmt: skip
            page.wait_for_selector("#model[data-phase=progressing]", timeout=20_000)
            first_step = int(page.get_attribute("#model", "data-step") or "0")
            page.wait_for_selector("#chart-traffic")
            points = int(page.get_attribute("#chart-traffic", "data-points") or "0")
            # The step advances and the charts gain points, with no reload.
            # Functions, not expressions: the page's CSP forbids eval, which an expression would need.
            page.wait_for_function(
                "(n) => Number(document.getElementById('model').dataset.step) > n", arg=first_step, timeout=90_000
            )
            page.wait_for_function(
                "(n) => Number(document.getElementById('chart-traffic').dataset.points) > n", arg=points, timeout=10_000
            )
            assert page.locator("figure[id^=chart-check-]").count() >= 1  # a chart per check
            wait_phase(control, "succeeded", 120)
            page.wait_for_selector("#model[data-phase=succeeded]", timeout=10_000)
            screenshot(page, tmp_path, "dashboard-model-promoted.png")

            control.StartRollout(rpb.StartRolloutRequest(model="digits", candidate="3", reason="browser test: v3"),
                                 timeout=10, metadata=WRITER)  # fmt: skip
            wait_phase(control, "rolled_back", 120)
            page.wait_for_selector("#model[data-phase=rolled_back]", timeout=10_000)

        rollback = page.locator("#audit tr[data-action=rollback]")
        rollback.first.wait_for(timeout=10_000)
        evidence = rollback.first.locator("td.evidence").inner_text()
        assert "accuracy" in evidence and "fail" in evidence and " vs " in evidence, evidence
        assert page.locator("#audit tr[data-action=promote], #audit tr[data-action=finish]").count() >= 1
        assert page.evaluate("window.__stayed") is True
        assert page.get_attribute("#updated", "data-at")
        path = screenshot(page, tmp_path, "dashboard-model.png")
        if os.environ.get("DASHBOARD_DOCS_SCREENSHOT") == "1":
            shutil.copy(path, ROOT / "docs" / "images" / "dashboard.png")

        page.goto(url)
        row = page.locator("tr[data-model=digits]")
        row.wait_for()
        assert row.get_attribute("data-phase") == "rolled_back"
        assert row.locator("td").nth(1).inner_text() == "v2"  # v2 was promoted, v3 rolled back
        screenshot(page, tmp_path, "dashboard-overview.png")
        assert not errors, errors
        context.close()
