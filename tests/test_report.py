"""The HTML report: `iotscan report` and `analyze --report` on the real samples, read back from NDJSON, its
bounds on a synthetic stream of 200,000 flows, its errors, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import gc
import html
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import orjson
import pytest

from iotscan.output import report as rb
from iotscan.output import report_html
from iotscan.output.report import BIN_WIDTHS, TimeBins, TopCounter
from tests import report_browser, report_data
from tests.conftest import REPO, SAMPLES, assert_no_traceback, ndjson, run_iotscan

MAX_PAGE = 5_000_000  # bytes: the bound for a million-flow capture's report


def normalized(page: str) -> str:
    """A page without what differs between two runs over the same records: title and time of generation."""
    page = re.sub(r"<title>.*?</title>|<h1>.*?</h1>", "", page)
    return re.sub(r"generated [^<]*", "", page)


def one_error_line(proc: subprocess.CompletedProcess[bytes], *parts: str) -> None:
    assert_no_traceback(proc)
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iotscan: error: "), lines
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The samples analysed with --report beside NDJSON, the same NDJSON made into a report, the samples made
    into a report directly, and the samples' plain NDJSON; run from the checkout, with paths as a user gives them."""
    out = tmp_path_factory.mktemp("report")
    paths = {name: out / name for name in ("tee.html", "tee.ndjson", "from-records.html", "direct.html",
                                           "plain.ndjson")}
    for args in (("analyze", "samples/", "--report", paths["tee.html"], "-o", paths["tee.ndjson"]),
                 ("report", paths["tee.ndjson"], "-o", paths["from-records.html"]),
                 ("report", "samples/", "-o", paths["direct.html"]),
                 ("analyze", "samples/", "-o", paths["plain.ndjson"])):
        proc = run_iotscan(*args, check_code=0)
        assert proc.stderr == b"", proc.stderr.decode()  # not even a warning of matplotlib's
    return paths


def _without_timing(path: Path) -> list[dict]:
    records = ndjson(path.read_bytes())
    for key in ("elapsed_s", "packets_per_s"):
        records[-1].pop(key)
    return records


def test_analyze_report_tees_the_records_unchanged(runs: dict[str, Path]) -> None:
    assert _without_timing(runs["tee.ndjson"]) == _without_timing(runs["plain.ndjson"])


def test_report_of_captures_equals_report_of_their_ndjson(runs: dict[str, Path]) -> None:
    """`report x.ndjson` reads the records back instead of analysing again, and draws the same page as the
    capture itself, through `report` or `analyze --report` (the figures' SVG included, byte for byte)."""
    pages = [normalized(runs[name].read_text()) for name in ("tee.html", "from-records.html", "direct.html")]
    assert pages[0] == pages[1] == pages[2]
    assert "<title>iotscan report: samples</title>" in runs["direct.html"].read_text()


def test_page_shows_what_the_records_hold(runs: dict[str, Path]) -> None:
    page = runs["direct.html"].read_text()
    text = html.unescape(page)
    records = ndjson(runs["plain.ndjson"].read_bytes())
    summary = records[-1]
    for tile in ("packets", "flows", "devices", "attacks"):
        assert f"<b>{summary[tile]:,}</b>" in page, tile
    assert summary["attack_families"], "the samples hold attacks"
    for family, flows in summary["attack_families"].items():
        assert re.search(rf">{family}</span></td><td class=\"n\">{flows:,}</td>", page), family
    for item in summary["inputs"]:
        assert item["source"] in text
    for device in (r for r in records if r["event_type"] == "device"):
        assert device["mac"] in text
    assert "TP-Link HS110 smart plug" in text
    # the attack flows shown are the highest-scored of their family, with their reasons
    attacks = [r for r in records if r.get("verdict") == "attack"]
    top = max(attacks, key=lambda r: (r["score"], r["bytes"]))
    assert f"{top['src_ip']}:{top['src_port']} → {top['dst_ip']}:{top['dst_port']}" in text
    assert all(reason in text for reason in top["reasons"])
    # the flow model's card: the threshold the flows were scored with, its leave-one-source-out figures
    assert f"threshold {summary['model']['threshold']}" in text
    assert "attack recall per capture" in text and "Device model" in text
    for anchor in ("summary", "timeline", "verdicts", "devices", "talk", "attacks", "model"):
        assert f'<section id="{anchor}">' in page
    # the host stage's alerts (the samples hold a DNS tunnel and an IRC bot) each shown with their message
    alerts = [r for r in records if r["event_type"] == "alert"]
    assert alerts and summary["alerts"] == len(alerts)
    assert '<section id="alerts">' in page
    for alert in alerts:
        assert alert["message"] in text


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (sudo apt-get install tshark)")
def test_inspect_commands_of_the_page_run(runs: dict[str, Path]) -> None:
    page = runs["direct.html"].read_text()
    commands = [html.unescape(c) for c in re.findall(r'<code class="cmd">(.*?)</code>', page)]
    assert len(commands) >= 10 and all(c.startswith("iotscan inspect samples/") for c in commands)
    argv = shlex.split(commands[-1])
    proc = run_iotscan(*argv[1:], "-f", "ndjson", check_code=0)
    packets = [r for r in ndjson(proc.stdout) if r.get("event_type") == "packet"]
    assert packets and {p["source"] for p in packets} == {argv[2]}


def test_page_fetches_nothing(runs: dict[str, Path]) -> None:
    """Self-contained: no script, every src or href inside the page (an anchor or a data: URI), and a
    Content-Security-Policy that forbids any load besides inline styles and data: images."""
    page = runs["direct.html"].read_text()
    assert "<script" not in page.lower()
    assert not [u for u in re.findall(r'(?:src|href)="([^"]*)"', page) if not u.startswith(("#", "data:"))]
    assert "default-src 'none'" in page
    assert page.count("<svg") >= 4


# -- bounds -----------------------------------------------------------------------------------------------------


def deep_size(root: object) -> int:
    """Bytes of the objects reachable from ``root``: its data, not the code and modules it refers to."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, todo, size = set(), [root], 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        todo.extend(gc.get_referents(obj))
    return size


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[rb.ReportBuilder, Path, list[int]]:
    """A report of 200,000 synthetic flows from 20 captures, then 1,000 devices, 1,000 alerts, 300 floods and 100
    unknown record types; the size of the builder's data after each quarter of the flows."""
    out = io.BytesIO()
    builder = rb.ReportBuilder(out, title="200,000 flows", threshold=0.8)
    sizes = []
    for i, record in enumerate(report_data.flows(200_000), 1):
        builder.write(record)
        if i % 50_000 == 0:
            sizes.append(deep_size(builder))
    for record in report_data.others():
        builder.write(record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's too
        builder.close({"event_type": "summary", "flows": 200_000, "inputs": [{"source": f"cap-{i}.pcap"}
                                                                             for i in range(500)]})
    path = tmp_path_factory.mktemp("big") / "big.html"
    path.write_bytes(out.getvalue())
    return builder, path, sizes


def test_report_of_200k_flows_stays_bounded(big: tuple[rb.ReportBuilder, Path, list[int]]) -> None:
    builder, path, sizes = big
    assert len(builder.pairs) <= 2 * rb.PAIRS and builder.pairs.cut_weight > 0, "the pairs were cut back"
    assert len(builder.apps) <= 2 * rb.APPS
    assert len(builder.device_attacks) <= 2 * rb.DEVICES
    assert len(builder.families) == rb.FAMILIES and "other" in builder.families
    for tally in builder.families.values():
        assert len(tally.samples) == rb.SAMPLES_PER_FAMILY
        assert len(tally.sources) <= rb.DISTINCT and len(tally.targets) <= rb.DISTINCT
        assert len(tally.reasons) <= 2 * rb.REASONS
    assert len(builder.sources) == rb.TRACKED_SOURCES and builder.sources_seen == 20
    for track in builder.sources.values():
        assert track.bins.hi - track.bins.lo < rb.TIMELINE_BINS and len(track.marks) <= rb.MARKERS
    assert (len(builder.devices), len(builder.alerts), len(builder.floods)) == (rb.DEVICES, rb.ALERTS, rb.FLOODS)
    assert len(builder.counts) <= 2 * rb.FAMILIES + 1
    assert sum(len(v) for v in builder.totals.merged.values() if isinstance(v, list)) <= 3 * rb.LISTED
    # memory follows the caps, not the flows: the second half of the stream adds (almost) nothing (a flow record
    # kept would add about 1 KB: 100 MB for 100,000)
    assert sizes[-1] < 20_000_000, sizes
    assert sizes[-1] - sizes[1] < 2_000_000, sizes
    # every flow is counted, though few are kept
    assert sum(sum(c.values()) for t in builder.sources.values() for c in t.bins.bins.values()) == \
        sum(t.flows for t in builder.sources.values())
    size = path.stat().st_size
    assert size < MAX_PAGE / 2, size


def test_page_of_200k_flows_escapes_the_attackers_words(big: tuple[rb.ReportBuilder, Path, list[int]]) -> None:
    page = big[1].read_text()
    assert "<script" not in page.lower() and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x" * (rb.TEXT + 1) not in page, "long strings are cut"
    assert not [u for u in re.findall(r'(?:src|href)="([^"]*)"', page) if not u.startswith(("#", "data:"))]
    assert "and 450 more" in page, "500 inputs: 50 listed"
    assert "Other records, not shown" in page and "future-0" in page


def test_time_bins_widen_exactly() -> None:
    rng = random.Random(3)
    times = sorted(rng.randrange(10**9, 10**9 + rng.choice((10**3, 10**6, 10**10))) for _ in range(20_000))
    rng.shuffle(times)
    bins = TimeBins()
    for t in times:
        bins.add(t, "a")
    assert bins.width_ms in BIN_WIDTHS or bins.width_ms % BIN_WIDTHS[-1] == 0
    assert bins.hi - bins.lo < rb.TIMELINE_BINS
    expected: dict[int, int] = {}
    for t in times:
        expected[t // bins.width_ms] = expected.get(t // bins.width_ms, 0) + 1
    assert {i: c["a"] for i, c in bins.bins.items()} == expected


def test_top_counter_keeps_the_heavy_hitters_exactly() -> None:
    """Ten keys seen 1,000 times each among 90,000 seen once: at most twice the capacity held, the ten exact."""
    counter = TopCounter(100, lambda: [0])
    for i in range(100_000):
        counter.slot(f"heavy-{i // 10 % 10}" if i % 10 == 0 else f"light-{i}")[0] += 1
        assert len(counter) <= 200
    assert dict((k, v[0]) for k, v in counter.top(10)) == {f"heavy-{j}": 1000 for j in range(10)}
    assert counter.cut_weight == 1


def test_the_peers_not_drawn_are_one_line_per_host() -> None:
    """A flood's one-flow sources: the 30 pairs drawn, and the rest of what the flooded host exchanged as one
    "other peers" line, to the byte."""
    builder = rb.ReportBuilder(io.BytesIO(), title="flood")
    for record in report_data.flows(3_000, sources=1):
        builder.write(record)
    pairs = builder.pairs.top(rb.GRAPH_PAIRS)
    others = {o[0]: o[2:] for o in report_html.other_peers(builder, pairs)}  # bytes, attack flows, flows
    for local, (size, flows, attacks) in builder.hosts.items.items():
        drawn = [v for ends, v in pairs if local in ends]
        if not drawn:
            continue
        if flows == sum(v[1] for v in drawn):
            assert local not in others
        else:
            assert others[local] == (size - sum(v[0] for v in drawn), attacks - sum(v[2] for v in drawn),
                                     flows - sum(v[1] for v in drawn))
    assert others, "3,000 flows of spoofed sources: most pairs are not drawn"


# -- errors, inputs ---------------------------------------------------------------------------------------------


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    proc = run_iotscan("report", SAMPLES / "web-sqli.pcap", "-o", tmp_path / "missing" / "r.html", check_code=2)
    one_error_line(proc, "r.html: cannot write output: No such file or directory")
    proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "--report", tmp_path / "missing" / "r.html",
                       check_code=2)
    one_error_line(proc, "cannot write output")
    assert proc.stdout == b"", "nothing analysed before the report's file failed"


def test_never_overwrites_an_input(tmp_path: Path, runs: dict[str, Path]) -> None:
    records = tmp_path / "x.ndjson"
    shutil.copy(runs["plain.ndjson"], records)
    before = records.read_bytes()
    one_error_line(run_iotscan("report", records, "-o", records, check_code=2), "refusing to overwrite an input")
    capture = tmp_path / "c.pcap"
    shutil.copy(SAMPLES / "web-sqli.pcap", capture)
    one_error_line(run_iotscan("analyze", capture, "--report", capture, "-o", tmp_path / "o.ndjson", check_code=2),
                   "refusing to overwrite an input")
    assert records.read_bytes() == before and capture.read_bytes() == (SAMPLES / "web-sqli.pcap").read_bytes()


def test_report_file_of_its_own(tmp_path: Path) -> None:
    same = tmp_path / "same"
    one_error_line(run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-o", same, "--report", same, check_code=2),
                   "-o and --report name the same file")
    one_error_line(run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "--report", "-", check_code=2),
                   "--report -: give the report a file name")


def test_directory_without_captures_is_exit_2_and_said_in_the_page(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no captures here")
    page = tmp_path / "r.html"
    one_error_line(run_iotscan("report", tmp_path, "-o", page, check_code=2), "holds no pcap or pcapng captures")
    assert "holds no pcap or pcapng captures" in page.read_text()


def test_json_that_is_not_iotscan_records_is_no_capture_either(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}\n')
    one_error_line(run_iotscan("report", other, "-o", tmp_path / "r.html", check_code=2),
                   "not a pcap or pcapng capture")


def test_records_cut_short_with_bad_lines(tmp_path: Path, runs: dict[str, Path]) -> None:
    """Records without their summary (a run cut short) and lines that are not records: the page counts what it
    got and says so; the flows' figures are the records'."""
    lines = runs["plain.ndjson"].read_bytes().splitlines()
    cut = tmp_path / "cut.ndjson"
    cut.write_bytes(b"\n".join([*lines[:500], b"not json", b'["a list"]', lines[500][:40]]) + b"\n")
    page = tmp_path / "r.html"
    proc = run_iotscan("report", cut, "-o", page, check_code=0)
    assert_no_traceback(proc)
    text = html.unescape(page.read_text())
    assert "3 lines are not iotscan records: skipped" in text
    assert "no summary record" in text
    flows = sum(1 for line in lines[:500] if orjson.loads(line)["event_type"] == "flow")
    assert f"<b>{flows:,}</b><span>flows</span>" in text


def test_stdin_records_and_stdin_capture(tmp_path: Path, runs: dict[str, Path]) -> None:
    page = tmp_path / "r.html"
    with runs["plain.ndjson"].open("rb") as stdin:
        run_iotscan("report", "-", "-o", page, stdin=stdin, check_code=0)
    assert normalized(page.read_text()) == normalized(runs["direct.html"].read_text())
    with (SAMPLES / "web-sqli.pcap").open("rb") as stdin:
        run_iotscan("report", "-", "-o", page, stdin=stdin, check_code=0)
    text = page.read_text()
    assert '<section id="attacks">' in text and "exploit" in text
    assert "iotscan inspect" not in text and "no command: not a capture file that can be read again" in text


def test_without_matplotlib_report_says_how_to_install_it(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is blocked for this test')\n")
    env = {"PYTHONPATH": f"{blocker.parent}:{REPO}"}
    page = tmp_path / "r.html"
    proc = run_iotscan("report", SAMPLES / "web-sqli.pcap", "-o", page, env=env, check_code=2)
    one_error_line(proc, "pip install matplotlib", "pip install 'iotscan[report]'")
    assert not page.exists(), "fails before writing anything"
    run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-o", tmp_path / "x.ndjson", env=env, check_code=0)


def test_other_commands_do_not_import_matplotlib() -> None:
    code = ("import runpy, sys\n"
            f"sys.argv = ['iotscan', 'analyze', {str(SAMPLES / 'web-sqli.pcap')!r}, '-o', '/dev/null']\n"
            "try:\n    runpy.run_module('iotscan', run_name='__main__')\nexcept SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'PIL'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split() == ["[]"]


# -- in a browser -----------------------------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(report_browser.missing() is not None, reason=report_browser.missing() or "")


@pytest.fixture(scope="module")
def browser():
    with report_browser.chromium() as b:
        yield b


@needs_browser
@pytest.mark.parametrize("which", ["samples", "200k flows"])
def test_chromium_renders_the_report(browser, which: str, runs: dict[str, Path], big, tmp_path: Path) -> None:
    """Headless Chromium opens the page from file://: no console error, no page error, no request but the file
    itself, every figure drawn with a size, nothing wider than the window; the screenshot is kept."""
    path = runs["direct.html"] if which == "samples" else big[1]
    with report_browser.visit(browser, path) as seen:
        page = seen.page
        assert seen.errors == []
        assert [m for m in seen.console if m[0] in ("error", "warning")] == []
        assert seen.requests == [path.resolve().as_uri()]
        figures = page.locator("figure svg")
        assert figures.count() == (4 if which == "samples" else 3)  # the synthetic stream has no model card
        for i in range(figures.count()):
            box = figures.nth(i).bounding_box()
            assert box and box["width"] > 600 and box["height"] > 100, (i, box)
            assert figures.nth(i).locator("path").count() > 5
        headings = page.locator("section h2").all_inner_texts()
        assert headings[:2] == ["Summary", "Timeline"] and "Attack flows" in headings
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
