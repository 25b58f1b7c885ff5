"""Regenerate docs/report.png: the HTML report of `iotscan analyze samples/ --report`, as headless Chromium shows it.

    .venv/bin/python docs/screenshots/make_report_screenshot.py

Run from anywhere in the checkout; needs Debian's chromium and playwright (install.sh installs both). The top of
the page (summary, attacks by family, the timeline) is kept, in 256 colours, to stay small.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.report_browser import chromium, missing, visit  # noqa: E402

OUT = REPO / "docs" / "report.png"
WIDTH, HEIGHT = 1200, 1900


def main() -> None:
    reason = missing()
    if reason:
        sys.exit(f"make_report_screenshot: {reason}")
    from PIL import Image  # matplotlib's own dependency: there with the report extra

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = ["analyze", "samples/", "--report", str(page), "-o", os.devnull]
        subprocess.run([sys.executable, "-m", "iotscan", *command], cwd=REPO, env=env, check=True)
        with chromium() as browser, visit(browser, page, width=WIDTH, height=HEIGHT) as seen:
            problems = seen.errors + [text for kind, text in seen.console if kind == "error"]
            if problems:
                sys.exit(f"make_report_screenshot: the page has errors: {problems}")
            png = seen.page.screenshot(clip={"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT})
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size / 1000:.0f} KB)")


if __name__ == "__main__":
    main()
