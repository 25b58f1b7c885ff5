"""The terminal table at 80, 120 and 200 columns, over the real records of `iotscan analyze samples/`: the reason
keeps its width, addresses stay whole on one line, flows are named by id prefixes unique in the run that
`iotscan inspect` takes, and records of types the table does not know (alerts, floods) do not break it."""

from __future__ import annotations

import bisect
import io
import itertools
import random
import re
import shlex
import shutil

import pytest

from iotscan.output.records import endpoint_text
from iotscan.output.table import WRAP_MIN, FlowIdPrefixes, TableSink
from tests.conftest import SAMPLES, assert_no_traceback, ndjson, run_iotscan

WIDTHS = (80, 120, 200)


@pytest.fixture(scope="module")
def samples_run() -> list[dict]:
    return ndjson(run_iotscan("analyze", SAMPLES, "-f", "ndjson", check_code=0).stdout)


def widest(text: str) -> int:
    """The longest line, but for the commands printed to be copied (a terminal wraps those itself)."""
    return max(len(line) for line in text.splitlines() if not line.startswith("iotscan inspect "))


def render(records: list[dict], width: int, **options) -> str:
    sink = TableSink(io.BytesIO(), width=width, **options)
    for r in records[:-1]:
        sink.write(r)
    sink.close(records[-1])
    return sink.out.getvalue().decode()


def table_rows(text: str, title: str) -> tuple[dict[str, tuple[int, int]], list[dict[str, list[str]]]]:
    """The columns (name: start, end) and rows (column: its lines) of the table whose title starts with
    ``title``, read back from the rendered text by the header's positions."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    rule = next(i for i in range(top, len(lines)) if set(lines[i].strip()) == {"─"})
    starts: dict[str, int] = {}
    for header in lines[top + 1:rule]:  # a two-line header names a column twice ("src" over "dst"): the first
        for m in re.finditer(r"\S+", header):
            if m.start() not in starts.values():
                starts.setdefault(m.group(), m.start())
    edges = sorted(starts.values())
    columns = {name: (start, next((e for e in edges if e > start), 10**6)) for name, start in starts.items()}
    rows: list[dict[str, list[str]]] = []
    first, (_, first_end) = min(columns.values())[0], min(columns.values())
    # the first column holds one line per row, or two ("flow" over "proto"; then "src" over "dst")
    per_row = 2 if "src" in columns and "dst" not in columns else 1
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        if line[first:first_end].strip() and (not rows or len(next(iter(rows[-1].values()))) >= per_row):
            rows.append({name: [] for name in columns})
        for name, (start, end) in columns.items():
            cell = line[start:end].strip()
            if cell:
                rows[-1][name].append(cell)
    return columns, rows


def _address(r: dict, end: str) -> str:
    ip, port = r[f"{end}_ip"], r[f"{end}_port"]
    return endpoint_text(ip, port) if r["protocol"] in (6, 17, 132) else ip


def _check_flow_rows(columns: dict[str, tuple[int, int]], rows: list[dict[str, list[str]]], ids: list[str],
                     records: dict[str, dict]) -> list[dict]:
    """Each row names one flow of the run by a unique prefix, and shows its two addresses whole, each on a line
    of its own: side by side, or (narrow) the responder under the initiator in one column, the protocol under
    the flow."""
    shown = []
    for row in rows:
        prefix = row["flow"][0]
        matches = [i for i in ids if i.startswith(prefix)]
        assert len(matches) == 1 and len(prefix) >= FlowIdPrefixes.MIN_DIGITS, (prefix, matches[:3])
        r = records[matches[0]]
        if "dst" in columns:
            assert row["src"] == [_address(r, "src")] and row["dst"] == [_address(r, "dst")], row
        else:
            assert row["src"] == [_address(r, "src"), _address(r, "dst")], row
            assert row["flow"][1] in ("tcp", "udp", "icmp", "icmpv6", "sctp", str(r["protocol"]))
        shown.append(r)
    return shown


@pytest.mark.parametrize("width", WIDTHS)
def test_table_keeps_the_reason_and_whole_addresses(samples_run: list[dict], width: int) -> None:
    text = render(samples_run, width)
    assert widest(text) <= width
    flows = [r for r in samples_run if r["event_type"] == "flow"]
    ids = [str(r["flow_id"]) for r in flows]
    records = {str(r["flow_id"]): r for r in flows}

    columns, rows = table_rows(text, "Attack flows")
    assert len(rows) == 20
    assert ("dst" in columns) == (width > 80)  # side by side from 120 columns
    shown = _check_flow_rows(columns, rows, ids, records)
    assert [r["score"] for r in shown] == sorted((r["score"] for r in shown), reverse=True)
    # the reason: whole, in a column at least WRAP_MIN wide
    start, end = columns["why"]
    why_width = max(len(line) for line in text.splitlines()) - start if end > 10**5 else end - start
    assert why_width >= WRAP_MIN
    for row, r in zip(rows, shown, strict=True):
        assert " ".join(row["why"]) == r["reasons"][0]
        wrapped = row["why"]
        assert all(len(line) >= WRAP_MIN for line in wrapped[:-1]) or len(r["reasons"][0]) < WRAP_MIN, wrapped
        if width == 200:
            assert len(wrapped) == 1  # wide enough for every reason of the samples on one line
    # the busiest flows (IPv6 link-local among them): addresses whole too
    columns, rows = table_rows(text, "Busiest flows")
    assert any(":" in r["src_ip"] for r in _check_flow_rows(columns, rows, ids, records))


@pytest.mark.parametrize("width", (80, 120))
def test_the_inspect_command_under_the_table_shows_the_top_attack(samples_run: list[dict], width: int) -> None:
    text = render(samples_run, width)
    _, rows = table_rows(text, "Attack flows")
    lines = text.splitlines()
    argv = shlex.split(lines[lines.index("Packets of the top attack:") + 1])
    assert argv[:4] == ["iotscan", "inspect", str(SAMPLES / "web-sqli.pcap"), rows[0]["flow"][0]]
    top = [r for r in samples_run if str(r.get("flow_id")).startswith(rows[0]["flow"][0])]
    assert len(top) == 1 and top[0]["verdict"] == "attack" and top[0]["source"] == argv[2]
    if width == 120 and shutil.which("tshark"):  # and it runs: the prefix names that flow
        proc = run_iotscan(*argv[1:], "-f", "ndjson", "--limit", "1", check_code=0, timeout=120)
        flow = ndjson(proc.stdout)[0]
        assert flow["event_type"] == "flow" and flow["flow_id"] == top[0]["flow_id"]


def test_non_default_time_outs_go_into_the_inspect_command(samples_run: list[dict]) -> None:
    text = render(samples_run, 120, inspect_args=("--idle-timeout", "60"))
    lines = text.splitlines()
    assert lines[lines.index("Packets of the top attack:") + 1].endswith("/tcp --idle-timeout 60")


def test_attacks_only_shows_whole_ids(samples_run: list[dict]) -> None:
    """Of an --attacks-only run the table sees only the attacks: a prefix unique among them may not be unique in
    the capture, so the ids are shown whole."""
    attacks = [r for r in samples_run if r.get("verdict") == "attack" or r["event_type"] == "summary"]
    _, rows = table_rows(render(attacks, 200), "Attack flows")
    ids = {str(r["flow_id"]) for r in attacks[:-1]}
    assert all(row["flow"][0] in ids for row in rows)


def test_alerts_floods_and_unknown_records_get_their_own_section(samples_run: list[dict]) -> None:
    """Records of other stages' types (shaped as records-coming.md plans them) are shown generically, a type the
    table does not know is left out, and nothing breaks."""
    alert = {"timestamp": "2017-07-06T13:41:55.000Z", "event_type": "alert", "source": "samples/web-sqli.pcap",
             "kind": "scan", "detail": "vertical", "family": "scan", "score": 0.93, "host_ip": "172.16.0.1",
             "host_mac": "00:c1:b1:14:eb:31", "host_device": "computer",
             "message": "172.16.0.1 probed 1,000 ports of 192.168.10.50 in 20 s", "reasons": ["many ports"],
             "evidence": {"ports": 1000}}
    flood = {"timestamp": "2020-01-01T00:00:01.000Z", "event_type": "flood", "source": "x.pcap", "family": "ddos",
             "target": {"ip": "fe80::1", "port": 80, "protocol": 6}, "packets": 3000, "flows": 2857}
    odd = {"event_type": "something_new", "whatever": [1, 2]}
    own = [r for r in samples_run[:-1] if r["event_type"] != "alert"]  # the samples' real alerts: tested below
    records = [*own, *[alert] * 12, flood, odd, samples_run[-1]]
    for width in WIDTHS:
        text = render(records, width)
        assert widest(text) <= width
        assert "Alerts (12, first 10 of 12)" in text and "Floods (1)" in text and "something_new" not in text
        _, rows = table_rows(text, "Alerts")
        assert len(rows) == 10
        assert rows[0]["time"] == ["13:41:55"] and " ".join(rows[0]["what"]) == "scan vertical"
        assert " ".join(rows[0]["host/target"]) == "172.16.0.1 (computer)"
        assert " ".join(rows[0]["message"]) == alert["message"]
        _, rows = table_rows(text, "Floods")
        assert " ".join(rows[0]["host/target"]) == "[fe80::1]:80/tcp" and " ".join(rows[0]["message"]) == \
            "3,000 packets, 2,857 flows"


def test_flow_id_prefixes_are_unique_in_the_run() -> None:
    """Against the exact answer (sorted ids): every prefix names one id of the set, is at least MIN_DIGITS long,
    and rarely longer than needed (only hash collisions in the sketch make it so)."""
    rng = random.Random(7)
    ids = [rng.getrandbits(63) for _ in range(50_000)]
    base = str(ids[0])
    ids += [int(base[:10] + "0" * (len(base) - 10)), ids[0] // 1000]  # shares 10 digits with ids[0]; a shorter id
    prefixes = FlowIdPrefixes()
    for i in ids:
        prefixes.add(i)
    texts = sorted(map(str, ids))
    longer = 0
    for i in [*ids[:3000], *ids[-2:]]:
        text, short = str(i), prefixes.short(i)
        at = bisect.bisect_left(texts, text)
        neighbours = [t for t in texts[max(at - 1, 0):at + 2] if t != text]  # the ids sharing most digits with it
        needed = max(FlowIdPrefixes.MIN_DIGITS, 1 + max(len(_common(text, t)) for t in neighbours))
        assert text.startswith(short) and len(short) >= min(needed, len(text)), (text, short, needed)
        at = bisect.bisect_left(texts, short)
        starting = [t for t in texts[at:at + 2] if t.startswith(short)]
        assert starting == [text] or short == text, (text, short, starting)  # the only id that starts so
        longer += len(short) > needed
    assert longer < 30  # collisions in the sketch make few prefixes longer than needed
    assert len(prefixes.short(ids[0])) >= 11


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_inspect_takes_a_unique_prefix_and_refuses_an_ambiguous_one() -> None:
    flood = SAMPLES / "synflood-spoofed.pcap"
    ids = sorted(str(r["flow_id"]) for r in ndjson(run_iotscan("analyze", flood, "-f", "ndjson", "--no-devices",
                                                               "--no-score", check_code=0).stdout)[:-1])
    shared = max((_common(a, b) for a, b in itertools.pairwise(ids)), key=len)
    assert len(shared) >= 6  # two of the flood's 2,857 ids share their first 6 digits
    proc = run_iotscan("inspect", flood, shared[:6])
    assert proc.returncode == 2 and b"ambiguous" in proc.stderr and b"give more digits" in proc.stderr
    assert_no_traceback(proc)
    assert all(i.encode() in proc.stderr for i in ids if i.startswith(shared[:6]))
    proc = run_iotscan("inspect", flood, shared[:5])
    assert proc.returncode == 2 and b"at least its first 6 digits" in proc.stderr
    if shutil.which("tshark"):
        unique = next(i for i in ids if sum(j.startswith(i[:7]) for j in ids) == 1)
        proc = run_iotscan("inspect", flood, unique[:7], "-f", "ndjson", check_code=0, timeout=120)
        assert str(ndjson(proc.stdout)[0]["flow_id"]) == unique


def test_the_samples_real_alerts_come_first(samples_run: list[dict]) -> None:
    """The host-behaviour stage's alerts of the samples (the DNS tunnel, the IRC bot) open the table."""
    alerts = [r for r in samples_run if r["event_type"] == "alert"]
    assert {(a["kind"], a["detail"]) for a in alerts} >= {("compromised", "dns_tunnel")}
    text = render(samples_run, 120)
    assert text.index(f"Alerts ({len(alerts)})") < text.index("Attacks by family")
