"""The pages in a real headless Chromium (Debian's, driven by Playwright): a tenant logs in
and sees the balance the CLI prints, no other tenant's page, every page works at 1280 and
at 390 px wide without a console error, and an account named like markup stays text."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from .conftest import XSS, World

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTHS = (1280, 390)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail("browser tests need Debian's chromium (./dev test installs it as root)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield launched
    launched.close()


class Session:
    """One browser context logged in as one credential, failing on any console error or
    script dialog (an XSS that ran)."""

    def __init__(self, browser: Browser, world: World, width: int) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page: Page = self.context.new_page()
        self.world = world
        self.page_errors: list[str] = []
        self.logged: list[tuple[str, str]] = []  # console errors: (text, the URL it names)
        # Documents answered 401/403/404 on purpose: Chromium logs each such load as a
        # console error naming its URL; that is the answer under test, not a fault.
        self.refused: set[str] = set()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("dialog", lambda d: self.page_errors.append(f"a dialog opened: {d.message}"))

    def login(self, who: str) -> None:
        self.page.goto(self.world.base + "/login")
        self.page.fill("#token", self.world.token(who))
        self.page.click("button[type=submit]")
        self.page.wait_for_load_state()

    def visit(self, path: str) -> int:
        """Opens ``path``; its status."""
        response = self.page.goto(self.world.base + path)
        assert response is not None
        if response.status >= 400:
            self.refused.add(response.url)
        return response.status

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.logged.append((message.text, message.location.get("url", "")))

    @property
    def errors(self) -> list[str]:
        """Console errors and page errors, but the refusals the test asked for (judged at
        the end: Chromium may log a load before ``goto`` returns its status)."""
        return self.page_errors + [
            text
            for text, url in self.logged
            if not (text.startswith("Failed to load resource") and url in self.refused)
        ]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser: Browser, world: World) -> Iterator[Session]:
    one = Session(browser, world, 1280)
    yield one
    one.close()
    assert one.errors == []


def test_a_tenant_logs_in_and_sees_the_balance_the_cli_prints(
    session: Session, world: World
) -> None:
    assert session.visit("/accounts/acme") == 200 and session.page.url.endswith("/login")
    session.login("acme")
    assert session.page.url == world.base + "/accounts/acme"
    shown = session.page.get_attribute("#remaining", "data-credits")
    printed = json.loads(world.cli("balance", "acme", "--format", "json"))
    assert shown == printed["remaining"]
    assert session.page.get_attribute("#used", "data-credits") == printed["used"]
    cookie = next(c for c in session.context.cookies() if c["name"] == "creditmeter_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_another_tenants_pages_are_404_and_staff_pages_403(session: Session) -> None:
    session.login("acme")
    for path in ("/accounts/globex", "/accounts/globex/jobs", "/accounts/nosuch"):
        assert session.visit(path) == 404, path
        assert "no account" in session.page.inner_text(".problem")
    for path in ("/staff/accounts", "/staff/reconcile", "/staff/agents"):
        assert session.visit(path) == 403, path


def test_a_wrong_token_is_refused_at_login(session: Session) -> None:
    session.page.goto(session.world.base + "/login")
    session.page.fill("#token", "not-a-token-of-this-collector")
    session.refused.add(session.world.base + "/login")
    with session.page.expect_response(lambda r: r.url.endswith("/login")) as answer:
        session.page.click("button[type=submit]")
    assert answer.value.status == 401
    assert "not one of this collector's" in session.page.inner_text(".problem")
    assert session.visit("/accounts/acme") == 200 and session.page.url.endswith("/login")


TENANT_PAGES = ("/accounts/acme", "/accounts/acme/jobs", "/accounts/acme/jobs?model=flux")
STAFF_PAGES = ("/staff/accounts", "/staff/reconcile", "/staff/agents", "/accounts/globex")


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_renders_at_both_widths_without_errors(
    browser: Browser, world: World, width: int, tmp_path: Path
) -> None:
    for who, pages in (("acme", TENANT_PAGES), ("staff", STAFF_PAGES)):
        one = Session(browser, world, width)
        try:
            one.login(who)
            for path in pages:
                assert one.visit(path) == 200, path
                # Nothing wider than the window: tables scroll inside their own box.
                overflow = one.page.evaluate(
                    "document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 0, (path, width, overflow)
                name = f"{who}{path.replace('/', '_').replace('?', '_')}-{width}.png"
                one.page.screenshot(path=str(tmp_path / name), full_page=True)
        finally:
            one.close()
        assert one.errors == [], (who, width, one.errors)
    assert len(list(tmp_path.glob("*.png"))) == len(TENANT_PAGES) + len(STAFF_PAGES)


def test_the_charts_have_their_numbers_beside_them(session: Session) -> None:
    session.login("acme")
    assert session.page.locator("svg.chart").count() == 2
    usage_rows = session.page.locator("#usage-table tbody tr").count()
    assert usage_rows >= 2  # sdxl and flux on the usage day
    assert session.page.locator("#statements a", has_text="download").count() == 1


def test_an_account_named_like_markup_shows_as_text(session: Session) -> None:
    session.login("xss")
    assert session.page.inner_text("h1") == XSS
    assert session.page.locator("script").count() == 0
    html = session.page.content()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert session.visit(f"/accounts/{quote(XSS, safe='')}/jobs") == 200
    assert session.page.inner_text("h1") == f"Jobs of {XSS}"


def test_the_statement_bundle_downloads(session: Session, world: World, tmp_path: Path) -> None:
    from creditmeter import verify

    session.login("acme")
    with session.page.expect_download() as waiting:
        session.page.click("#statements a")
    target = tmp_path / "bundle.json"
    waiting.value.save_as(target)
    summary, report = verify.verify(json.loads(target.read_text()), world.collector_key_hex)
    assert report.problems == [] and summary.startswith("statement of acme")
