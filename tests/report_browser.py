"""Headless Chromium (Debian's `chromium`, driven by Playwright; never `playwright install`, which downloads
browsers) for the HTML report: a page loaded from file:// with every request it makes recorded and any that
would leave the file refused, its console messages and page errors collected. The browser test and
docs/screenshots/make_report_screenshot.py use it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# no sandbox: CI runs as root, where Chromium's sandbox refuses to start; the rest keeps Chromium from calling home
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def missing() -> str | None:
    """Why the browser cannot run here (a user's machine without Chromium or Playwright), or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is absent: install Debian's chromium package (install.sh does) to render the report"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install '.[test]')"
    return None


@dataclass
class Visit:
    """What loading a page did: the page, every request it made, console messages (type, text), page errors."""

    page: Any
    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def visit(browser: Any, path: Path, width: int = 1280, height: int = 900) -> Iterator[Visit]:
    """Open ``path`` from file:// in a fresh context: only the file itself may load, anything else is aborted
    (and recorded)."""
    url = path.resolve().as_uri()
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    seen = Visit(page)

    def route(r: Any) -> None:
        seen.requests.append(r.request.url)
        if r.request.url == url:
            r.continue_()
        else:
            r.abort()

    context.route("**/*", route)
    page.on("console", lambda m: seen.console.append((m.type, m.text)))
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    try:
        page.goto(url, wait_until="load")
        yield seen
    finally:
        context.close()
