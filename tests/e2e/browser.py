"""A real headless browser for the dashboard tests: Debian's chromium (`make browser` installs
it: tools/install_browser.sh), driven by Playwright. Screenshots go to `ARTIFACTS`
(build/test-artifacts/dashboard, or $JOBTREE_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("JOBTREE_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts") / "dashboard"


def chromium_path() -> str:
    for name in (os.environ.get("JOBTREE_CHROMIUM") or "", "chromium", "chromium-browser"):
        found = shutil.which(name) if name else None
        if found:
            return found
    pytest.fail("no chromium: run `make browser` (tools/install_browser.sh installs Debian's chromium)")


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A page of a fresh headless chromium; console errors and page errors fail the test."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()
    assert not errors, f"the page logged errors: {errors}"


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def shown(page: Any, url: str) -> None:
    """Open `url` and wait until the view has drawn from the server's JSON."""
    page.goto(url)
    page.wait_for_function("document.body.dataset.sequence !== undefined")
    if "#" in url:  # a route change on the same page: wait until that route is drawn
        page.wait_for_function("route => document.body.dataset.route === route", arg="#" + url.split("#", 1)[1])
