"""`iotscan analyze` end to end on real captures: the output contract, formats, bad input, exit codes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import NDPI_PCAPS, REPO, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan
from nfstream.plugin import NFPlugin

from iotscan.capture.inputs import expand
from iotscan.cli.common import main_pass_config
from iotscan.output.records import FLOW_FIELD_NAMES, SUMMARY_FIELDS, community_id
from iotscan.output.sinks import NdjsonSink
from iotscan.pipeline import Analysis, _gc_paced
from iotscan.stage import Event, SourceInfo, Stage

SAMPLE_FILES = sorted(SAMPLES.glob("*.pcap"))


def analyze(*args, code: int = 0) -> tuple[list[dict], subprocess.CompletedProcess]:
    proc = run_iotscan("analyze", *args, "--format", "ndjson")
    assert_no_traceback(proc)
    assert proc.returncode == code, proc.stderr.decode()
    return ndjson(proc.stdout), proc


def split(records: list[dict]) -> tuple[list[dict], dict]:
    assert records, "no output at all"
    summary = records[-1]
    assert summary["event_type"] == "summary", "the summary must be the last record"
    assert all(r["event_type"] != "summary" for r in records[:-1])
    return [r for r in records if r["event_type"] == "flow"], summary


@pytest.mark.parametrize("sample", SAMPLE_FILES, ids=lambda p: p.name)
def test_sample_flows_follow_the_contract(sample: Path) -> None:
    flows, summary = split(analyze(sample)[0])
    assert flows
    for flow in flows:
        assert list(flow)[: len(FLOW_FIELD_NAMES)] == list(FLOW_FIELD_NAMES)
        assert flow["source"] == str(sample)
        assert flow["packets"] == flow["src2dst_packets"] + flow["dst2src_packets"] >= 1
        assert flow["bytes"] == flow["src2dst_bytes"] + flow["dst2src_bytes"]
        assert flow["last_seen_ms"] - flow["first_seen_ms"] == flow["duration_ms"] >= 0
        assert 1_000_000_000_000 < flow["first_seen_ms"] < 2_000_000_000_000  # epoch milliseconds
        # the same instant as Suricata's EVE writes it, which Elastic and Splunk take as the event's time
        assert dt.datetime.strptime(flow["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z") == dt.datetime.fromtimestamp(
            flow["first_seen_ms"] / 1000, dt.timezone.utc)
        if flow["protocol"] in (6, 17):
            assert flow["community_id"].startswith("1:")
    assert len({f["flow_id"] for f in flows}) == len(flows), "flow_id must be unique within a run"
    for name, _ in SUMMARY_FIELDS:
        assert name in summary
    # every flow is counted: a flood's one- and two-packet flows are folded into flood records (tests/test_floods.py)
    assert summary["flows"] == len(flows) + summary["folded_flows"]
    assert summary["packets"] >= sum(f["packets"] for f in flows)
    assert summary["inputs"] == [{"source": str(sample), "packets": summary["packets"], "flows": summary["flows"],
                                  "status": "ok"}]
    assert summary["warnings"] == [] and summary["errors"] == []


def test_known_flows_of_the_tplink_sample() -> None:
    """Values read from the capture with tshark: the DHCP request and the plug's TLS session to its cloud."""
    flows, _ = split(analyze(SAMPLES / "tplink-hs110-setup.pcap")[0])
    dhcp = next(f for f in flows if f["src_port"] == 68 and f["dst_port"] == 67)
    assert dhcp["src_mac"] == "50:c7:bf:00:c7:03"
    assert dhcp["dhcp_hostname"] == "hs110(eu)" and dhcp["app"] == "DHCP"
    assert dhcp["dhcp_fingerprint"] == "1,3,6,12,15,28"
    assert dhcp["packets"] == 3 and dhcp["bytes"] == 1770
    tls = next(f for f in flows if f["dst_port"] == 50443)
    assert (tls["src_ip"], tls["src_port"], tls["dst_ip"], tls["protocol"]) == ("10.10.10.20", 34988, "52.49.65.150", 6)
    # tshark -r samples/tplink-hs110-setup.pcap --enable-protocol communityid -T fields -e communityid
    assert tls["community_id"] == "1:QubvBLNFNN5jwob4XVZffy9rJqE="


def test_community_id_matches_the_specification() -> None:
    # The Community ID specification's TCP example, both directions.
    assert community_id("128.232.110.120", "66.35.250.204", 6, 34855, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id("66.35.250.204", "128.232.110.120", 6, 80, 34855) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    # And the communityid package's own calc() on varied tuples (IPv4/IPv6, port order, port-less protocols).
    import random

    from communityid import CommunityID, FlowTuple

    reference = CommunityID()
    rng = random.Random(7)
    for _ in range(300):
        v6 = rng.random() < 0.3
        addr = (lambda: ":".join(f"{rng.getrandbits(16):x}" for _ in range(8))) if v6 else \
            (lambda: ".".join(str(rng.randrange(256)) for _ in range(4)))
        src, dst = addr(), addr()
        proto = rng.choice((6, 17, 132, 47, 50))
        sport, dport = rng.randrange(65536), rng.choice((53, 80, 443, rng.randrange(65536)))
        ports = (sport, dport) if proto in (6, 17, 132) else ()
        expected = reference.calc(FlowTuple(proto, src, dst, *ports))
        assert community_id(src, dst, proto, sport, dport) == expected, (src, dst, proto, sport, dport)


def test_flow_ids_are_stable_across_runs() -> None:
    first, _ = split(analyze(SAMPLES / "hue-bridge-setup.pcap")[0])
    second, _ = split(analyze(SAMPLES / "hue-bridge-setup.pcap")[0])
    assert [f["flow_id"] for f in first] == [f["flow_id"] for f in second]


def test_directory_input_and_all_formats(tmp_path: Path) -> None:
    records, _ = analyze(SAMPLES)
    flows, summary = split(records)
    assert {f["source"] for f in flows} == {str(p) for p in SAMPLE_FILES}
    assert [i["source"] for i in summary["inputs"]] == [str(p) for p in SAMPLE_FILES]

    doc = orjson.loads(run_iotscan("analyze", SAMPLES, "-f", "json", check_code=0).stdout)
    # the samples hold a DNS tunnel and an IRC bot: the host-behaviour stage's alerts have a list of their own; the
    # spoofed SYN flood's flows are folded into a flood record (tests/test_floods.py)
    assert set(doc) == {"flows", "alerts", "devices", "floods", "summary"} and len(doc["flows"]) == len(flows)
    assert len(doc["alerts"]) == doc["summary"]["alerts"] == len([r for r in records if r["event_type"] == "alert"])
    assert len(doc["devices"]) == doc["summary"]["devices"] == summary["devices"] > 0
    assert doc["flows"][0] == flows[0] and doc["summary"]["flows"] == summary["flows"]

    rows = list(csv.reader(io.StringIO(run_iotscan("analyze", SAMPLES, "-f", "csv", check_code=0).stdout.decode())))
    assert tuple(rows[0][: len(FLOW_FIELD_NAMES)]) == FLOW_FIELD_NAMES
    assert len(rows) - 1 == len(flows)

    table = run_iotscan("analyze", SAMPLES / "hue-bridge-setup.pcap", "-f", "table", check_code=0).stdout.decode()
    assert "Busiest flows" in table and "Summary" in table and "www.ecdinterface.philips.com" in table

    out = tmp_path / "flows.csv"  # the format follows the output file's suffix
    run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-o", out, check_code=0)
    assert out.read_text().startswith("timestamp,event_type,flow_id,community_id")


def test_bpf_filter_and_invalid_bpf() -> None:
    flows, _ = split(analyze(SAMPLES / "hue-bridge-setup.pcap", "--bpf", "udp port 53")[0])
    assert flows and all(53 in (f["src_port"], f["dst_port"]) for f in flows)
    proc = run_iotscan("analyze", SAMPLES / "hue-bridge-setup.pcap", "--bpf", "port nonsense")
    assert proc.returncode == 2 and b"invalid BPF filter" in proc.stderr
    assert_no_traceback(proc)


def test_flow_cap_expires_early_and_warns() -> None:
    capped, summary = split(analyze(SAMPLES / "mirai-c2-irc.pcap", "--max-flows", "5")[0])
    uncapped, full = split(analyze(SAMPLES / "mirai-c2-irc.pcap")[0])
    assert summary["packets"] == full["packets"]
    assert sum(f["packets"] for f in capped) == sum(f["packets"] for f in uncapped), "no packet may be lost"
    assert len(capped) > len(uncapped)
    # a cap of 5 leaves room for 1 embryonic flow: most new flows are expired early as embryos (an emergency)
    assert [w["code"] for w in summary["warnings"]] == ["flow_cap", "flow_emergency"][:len(summary["warnings"])]
    assert {w["code"] for w in summary["warnings"]} == {"flow_cap", "flow_emergency"}


def test_fail_on_decides_the_exit_code() -> None:
    flows, _ = split(analyze(SAMPLES / "tplink-hs110-setup.pcap", "--fail-on", "attack", code=0)[0])
    assert not any(f.get("verdict") == "attack" for f in flows)


# -- bad input ---------------------------------------------------------------------------------------

def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert_no_traceback(proc)
    lines = [line for line in proc.stderr.decode().splitlines() if line.startswith("iotscan: error:")]
    assert lines, proc.stderr.decode()
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)


def _pcap_header(link_type: int) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, link_type)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.pcap", b"", "empty file"),
    ("notes.pcap", b"these are not packets\n" * 10, "not a pcap or pcapng capture"),
    ("archive.pcap.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40, "cannot read the gzip stream"),
    ("header.pcap", _pcap_header(1)[:10], "header is incomplete"),
    ("sll2.pcap", _pcap_header(276) + struct.pack("<IIII", 0, 0, 4, 4) + b"\x00" * 4, "unsupported link type 276"),
])
def test_unusable_file_gives_one_line_and_exit_2(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    before = path.read_bytes()
    records, proc = analyze(path, code=2)
    _one_error_line(proc, str(path), message)
    _, summary = split(records)
    assert summary["flows"] == 0 and summary["errors"][0]["source"] == str(path)
    assert path.read_bytes() == before, "inputs are never modified"


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    _, proc = analyze(tmp_path / "nope.pcap", code=2)
    _one_error_line(proc, "nope.pcap: no such file")
    (tmp_path / "readme.txt").write_text("no captures here")
    _, proc = analyze(tmp_path, code=2)
    _one_error_line(proc, "holds no pcap or pcapng captures")


def test_one_bad_input_does_not_stop_the_others(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"garbage" * 20)
    records, proc = analyze(bad, SAMPLES / "tplink-hs110-setup.pcap", code=2)
    flows, summary = split(records)
    _one_error_line(proc, "bad.pcap")
    assert flows and {f["source"] for f in flows} == {str(SAMPLES / "tplink-hs110-setup.pcap")}
    assert [i["status"] for i in summary["inputs"]] == ["ok"]


def test_truncated_capture_yields_flows_before_the_damage(tmp_path: Path) -> None:
    whole = SAMPLES / "hue-bridge-setup.pcap"
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2 + 7])  # cut inside a packet
    flows, summary = split(analyze(cut, code=0)[0])
    full, full_summary = split(analyze(whole)[0])
    assert 0 < summary["packets"] < full_summary["packets"]
    assert 0 < len(flows) <= len(full)
    assert [w["code"] for w in summary["warnings"]] == ["truncated"]
    assert summary["inputs"][0]["status"] == "truncated"


def test_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    capture = tmp_path / "c.pcap"
    capture.write_bytes((SAMPLES / "tplink-hs110-setup.pcap").read_bytes())
    before = capture.read_bytes()
    proc = run_iotscan("analyze", capture, "-o", capture)
    assert proc.returncode == 2
    _one_error_line(proc, "refusing to overwrite an input")
    assert capture.read_bytes() == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail: disk full)")
@pytest.mark.parametrize("fmt", ["ndjson", "json", "csv", "table"])
def test_a_full_disk_is_a_one_line_output_error(fmt: str) -> None:
    """Writes that fail (every one, as on a full disk), to a file or to stdout, end the run with exit 2 and one
    line naming the output, not an internal error, and nothing more at exit (stdout's last flush)."""
    to_file = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-f", fmt, "-o", "/dev/full", check_code=2)
    with open("/dev/full", "wb") as full:
        to_stdout = subprocess.run([sys.executable, "-m", "iotscan", "analyze", str(SAMPLES / "web-sqli.pcap"),
                                    "-f", fmt], stdout=full, stderr=subprocess.PIPE, cwd=REPO, timeout=300)
    assert to_stdout.returncode == 2, to_stdout.stderr.decode()
    for proc, name in ((to_file, "/dev/full"), (to_stdout, "stdout")):
        _one_error_line(proc, f"{name}: cannot write output: No space left on device")
        assert len(proc.stderr.decode().splitlines()) == 1, proc.stderr.decode()


# -- stdin, pipes and compressed captures: read once into a temporary file ---------------------------

LOG4J = SAMPLES / "log4j-exploit.pcap"


def _spooled_run(tmp_path: Path, *args: str | Path, code: int = 0, **kwargs) -> tuple[list[dict], dict, str]:
    """analyze with its temporary files in a directory of the test's, which must be empty again after."""
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir(exist_ok=True)
    proc = run_iotscan("analyze", *args, "-f", "ndjson", env={"TMPDIR": str(spool_dir)}, **kwargs)
    assert_no_traceback(proc)
    assert proc.returncode == code, proc.stderr.decode()
    assert list(spool_dir.iterdir()) == []  # the copy is removed
    flows, summary = split(ndjson(proc.stdout))
    return flows, summary, proc.stderr.decode()


def _same_flows(flows: list[dict], source: str) -> None:
    """The flows of LOG4J read directly, with another source (and so other flow ids): scored, exploits found."""
    plain, _ = split(analyze(LOG4J)[0])

    def key(r: dict) -> bytes:
        return orjson.dumps({k: v for k, v in r.items() if k not in ("source", "flow_id")}, option=orjson.OPT_SORT_KEYS)

    assert sorted(map(key, flows)) == sorted(map(key, plain))
    assert {f["source"] for f in flows} == {source}
    assert any(f["verdict"] == "attack" and f["family"] == "exploit" for f in flows)


@pytest.mark.parametrize("codec", ["gzip", "bz2", "lzma"])
def test_compressed_capture_is_read_decompressed(tmp_path: Path, codec: str) -> None:
    module = __import__(codec)
    packed = tmp_path / f"log4j.pcap.{codec}"
    packed.write_bytes(module.compress(LOG4J.read_bytes()))
    flows, summary, _ = _spooled_run(tmp_path, packed)
    _same_flows(flows, str(packed))
    assert summary["warnings"] == []  # the side passes (requests, identities) read the copy too
    assert [i["status"] for i in summary["inputs"]] == ["ok"]


def test_damaged_gzip_keeps_the_flows_before_the_damage(tmp_path: Path) -> None:
    import gzip

    whole = SAMPLES / "hue-bridge-setup.pcap"
    packed = gzip.compress(whole.read_bytes())
    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    flows, summary, _ = _spooled_run(tmp_path, cut)
    full, _ = split(analyze(whole)[0])
    assert 0 < len(flows) < len(full)
    assert any(w["code"] == "truncated" and "the gzip stream is damaged after" in w["message"]
               for w in summary["warnings"])
    assert [i["status"] for i in summary["inputs"]] == ["truncated"]
    # nothing decompresses at all: an error for that input
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"\x1f\x8b" + bytes(range(64)))
    _, summary, err = _spooled_run(tmp_path, junk, code=2)
    assert summary["errors"] == [{"source": str(junk), "message": "cannot read the gzip stream: Unknown compression "
                                  "method"}]
    assert err.count("iotscan: error:") == 1


def test_directory_with_compressed_captures(tmp_path: Path) -> None:
    """An archive folder: a gzipped capture is read, a compressed log and a FIFO (which would block) are
    skipped."""
    import gzip

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "day1.pcap.gz").write_bytes(gzip.compress(LOG4J.read_bytes()))
    (archive / "syslog.gz").write_bytes(gzip.compress(b"Dec  3 12:00:00 host kernel: nothing\n" * 100))
    os.mkfifo(archive / "pipe")
    flows, summary, _ = _spooled_run(tmp_path, archive, timeout=120)
    _same_flows(flows, str(archive / "day1.pcap.gz"))
    assert [i["source"] for i in summary["inputs"]] == [str(archive / "day1.pcap.gz")]
    assert summary["errors"] == [] and summary["warnings"] == []


class _ProgressProbe(Stage):
    """Polls the progress bar's poller once flows stream, as the bar's thread does."""

    def __init__(self) -> None:
        super().__init__()
        self.analysis: Analysis | None = None
        self.polled: tuple[str, int | None, int, str] | None = None

    def begin(self, source: SourceInfo) -> None:
        assert self.analysis is not None
        self.poll = self.analysis._file_poller(source)

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        for event in events:
            if self.polled is None:
                self.polled = self.poll()
            yield event


def test_progress_follows_the_copy_of_a_compressed_capture(tmp_path: Path) -> None:
    """The bar's bytes are how far the meter read the file it reads: the copy, not the .gz it came from. The
    sample's packets 60 times over, with a flow table of one flow, so that flows stream while the meter reads."""
    import gzip

    sample = (SAMPLES / "hue-bridge-setup.pcap").read_bytes()
    plain = sample[:24] + sample[24:] * 60
    packed = tmp_path / "hue.pcap.gz"
    packed.write_bytes(gzip.compress(plain, compresslevel=1))
    probe = _ProgressProbe()
    analysis = probe.analysis = Analysis(NdjsonSink(io.BytesIO()), stages=[probe])
    analysis.run_files([packed], main_pass_config("", score=False, max_flows=1))
    assert probe.polled is not None
    label, total, done, _ = probe.polled
    assert label == packed.name and total == len(plain)
    assert 0 < done < total


def test_a_copy_tells_how_far_it_is(tmp_path: Path) -> None:
    """What the progress bar shows while a compressed capture is decompressed: its name, and the bytes so far."""
    import gzip

    packed = tmp_path / "log4j.pcap.gz"
    packed.write_bytes(gzip.compress(LOG4J.read_bytes()))
    calls: list[tuple[str, Callable[[], int]]] = []
    items = list(expand([packed, LOG4J], on_copy=lambda name, copied: calls.append((name, copied))))
    try:
        assert [name for name, _ in calls] == [str(packed)]  # the plain capture is read as it is
        assert calls[0][1]() == LOG4J.stat().st_size == items[0].size
    finally:
        items[0].path.unlink()


def test_stdin_dash_is_read(tmp_path: Path) -> None:
    flows, summary, _ = _spooled_run(tmp_path, "-", input=LOG4J.read_bytes())
    _same_flows(flows, "-")
    assert summary["inputs"][0]["source"] == "-" and summary["warnings"] == []
    # the copy is gone once analysed: --explain has no inspect command to give, and says so
    flows, summary, _ = _spooled_run(tmp_path, "-", "--explain", input=LOG4J.read_bytes())
    assert not any("inspect" in f for f in flows)
    assert [w["code"] for w in summary["warnings"]] == ["explain"]
    _, summary, _ = _spooled_run(tmp_path, "-", code=2, input=b"")
    assert summary["errors"] == [{"source": "-", "message": "stdin is empty (0 bytes)"}]
    _, summary, _ = _spooled_run(tmp_path, "-", code=2, input=b"# not a capture\n" * 100_000)
    assert summary["errors"][0]["message"].startswith("not a pcap or pcapng capture")


def test_stdin_that_is_a_terminal_is_refused(tmp_path: Path) -> None:
    import pty

    controller, terminal = pty.openpty()
    try:
        _, summary, err = _spooled_run(tmp_path, "-", code=2, stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "stdin is a terminal" in summary["errors"][0]["message"] and "iotscan: error: -: stdin is a terminal" in err


def test_fifo_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f'cat "{LOG4J}" > "{fifo}"'])
    try:
        flows, _, _ = _spooled_run(tmp_path, fifo)
    finally:
        writer.wait(timeout=60)
    _same_flows(flows, str(fifo))


def test_ctrl_c_ends_a_stream_and_what_came_is_analysed(tmp_path: Path) -> None:
    # `tcpdump -w - | iotscan analyze -` ends with Ctrl-C, which reaches iotscan perhaps before its writer has
    # closed the pipe (here the writer never does): the read must not wait on, and what came is analysed
    spool_dir, out = tmp_path / "tmp", tmp_path / "out.ndjson"
    spool_dir.mkdir()
    data = LOG4J.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(spool_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", "-", "-f", "ndjson", "-o", str(out)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size == len(data) for p in spool_dir.iterdir()):  # all of it is copied
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # with the pipe still open
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    assert "Traceback" not in proc.stderr.read().decode()
    assert proc.returncode == 130  # the results are partial: the stream was cut
    flows, summary = split(ndjson(out.read_bytes()))
    _same_flows(flows, "-")
    assert [i["status"] for i in summary["inputs"]] == ["interrupted"]
    assert [(w["source"], w["code"]) for w in summary["warnings"]] == [("-", "interrupted"), ("", "interrupted")]
    assert list(spool_dir.iterdir()) == []


def test_ctrl_c_while_a_compressed_file_is_copied_drops_the_copy(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a file is no stream that only Ctrl-C ends: Ctrl-C stops its decompression at once (the signal handler
    # raises CopyInterrupted in the copy loop, as the reader does here after the first chunk), nothing is left
    import tempfile

    from iotscan.capture import inputs

    class Stopped(io.BytesIO):
        def read1(self, size: int = -1) -> bytes:
            if self.tell():
                raise inputs.CopyInterrupted
            return super().read1(size)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = LOG4J.read_bytes()
    assert inputs.spool(Stopped(data), "x.pcap.gz", "the gzip stream") == \
        inputs.InputProblem("x.pcap.gz", "interrupted by the user")
    assert list(tmp_path.iterdir()) == [] and not inputs.copy_in_progress()
    kept = inputs.spool(Stopped(data), "-", "stdin", keep_cut=True)  # a stream keeps what came
    assert isinstance(kept, inputs.CaptureFile) and kept.cut and kept.size == len(data)
    kept.path.unlink()


def test_endless_device_that_is_no_capture_stops_at_once(tmp_path: Path) -> None:
    """/dev/zero never ends: only its first bytes are copied, enough to say it is no capture."""
    _, summary, _ = _spooled_run(tmp_path, "/dev/zero", code=2, timeout=60)
    assert summary["errors"] == [{"source": "/dev/zero", "message": "not a pcap or pcapng capture (magic bytes "
                                  "00000000)"}]


def test_dash_output_is_stdout(tmp_path: Path) -> None:
    proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-o", "-", "--no-score", cwd=tmp_path, check_code=0)
    records = ndjson(proc.stdout)
    assert records[-1]["event_type"] == "summary" and records[-1]["flows"] > 0
    assert not (tmp_path / "-").exists()


def test_bad_option_is_a_usage_error() -> None:
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--format", "xml")
    assert proc.returncode == 2
    assert_no_traceback(proc)


# -- the nDPI corpus: ~540 real captures of hundreds of protocols, malformed ones included --------------

@pytest.fixture(scope="module")
def corpus_run() -> tuple[list[dict], subprocess.CompletedProcess]:
    ndpi = require_shared("pcaps", "ndpi")
    proc = run_iotscan("analyze", ndpi, "--format", "ndjson", timeout=900)
    return ndjson(proc.stdout), proc


def test_corpus_runs_without_traceback(corpus_run) -> None:
    records, proc = corpus_run
    assert_no_traceback(proc)
    assert proc.returncode in (0, 2), proc.stderr.decode()[-2000:]
    flows, summary = split(records)
    captures = sorted(p for p in NDPI_PCAPS.iterdir() if p.is_file() and p.suffix in (".pcap", ".pcapng"))
    accounted = {i["source"] for i in summary["inputs"]} | {e["source"] for e in summary["errors"]}
    assert {str(p) for p in captures} <= accounted, "every capture is analysed or reported"
    assert (proc.returncode == 2) == bool(summary["errors"])
    for error in summary["errors"]:  # each one is reported as one line on stderr
        assert f"iotscan: error: {error['source']}: {error['message']}" in proc.stderr.decode()
    assert len(flows) > 8000 and summary["flows"] == len(flows)


def _expected_ndpi_flows(expected: Path) -> dict[tuple, str]:
    """Flows nDPI itself reports for a capture: {(proto, endpoint pair): master protocol}."""
    pattern = re.compile(r"^\s+\d+\s+(TCP|UDP)\s+(\S+) <?-> (\S+) .*?\[proto: [\d.]+/([^\]]+)\]")
    flows = {}
    for line in expected.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            proto, a, b, name = m.groups()
            flows[(proto, frozenset((a, b)))] = name.split(".")[0]
    return flows


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_corpus_detections_agree_with_ndpi(corpus_run) -> None:
    """Our flows carry nDPI's own detections: most flows nDPI lists are found with the same protocol.
    (NFStream bundles an older nDPI than the corpus's expected output, so agreement is high, not total.)"""
    records, _ = corpus_run
    ours: dict[tuple, set[str]] = {}
    for f in records:
        if f["event_type"] == "flow" and f["protocol"] in (6, 17):
            key = ("TCP" if f["protocol"] == 6 else "UDP",
                   frozenset((_endpoint(f["src_ip"], f["src_port"]), _endpoint(f["dst_ip"], f["dst_port"]))))
            ours.setdefault(key, set()).add((f["app"] or "Unknown").split(".")[0])
    expected: dict[tuple, str] = {}
    for out in sorted((NDPI_PCAPS / "expected").glob("*.out")):
        expected.update(_expected_ndpi_flows(out))
    found = [key for key in expected if key in ours]
    same = [key for key in found if expected[key] in ours[key]]
    assert len(expected) > 5000
    assert len(found) / len(expected) > 0.9, (len(found), len(expected))
    assert len(same) / len(found) > 0.8, (len(same), len(found))


MALFORMED = ["dhcp-fuzz.pcapng", "fuzz-2006-06-26-2594.pcap", "fuzz-2006-09-29-28586.pcap",
             "fuzz-2020-02-16-11740.pcap", "fuzz-2021-06-07-c6c72a0a56.pcap", "fuzz-2021-10-13.pcap",
             "kerberos_fuzz.pcapng", "quic-fuzz-overflow.pcapng", "tls-esni-fuzzed.pcap", "malformed_dns.pcap",
             "malformed_icmp.pcap", "bad-dns-traffic.pcap", "badpackets.pcap"]


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_corpus_captures_each_end_cleanly(name: str) -> None:
    path = require_shared("pcaps", "ndpi", name)
    flows, summary = split(analyze(path, code=0)[0])
    assert summary["inputs"][0]["status"] in ("ok", "truncated")
    assert summary["flows"] == len(flows)


# -- streaming and interruption ------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "iotscan", "analyze", *args, "--format", "ndjson"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_flows_stream_out_before_the_input_ends() -> None:
    ndpi = require_shared("pcaps", "ndpi")
    proc = _spawn(str(ndpi))
    try:
        first = orjson.loads(proc.stdout.readline())
        assert first["event_type"] == "flow"
        assert proc.poll() is None, "the first flow must come out while the analysis is still running"
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_flushes_active_flows_and_writes_the_summary() -> None:
    ndpi = require_shared("pcaps", "ndpi")
    proc = _spawn(str(ndpi))
    first = proc.stdout.readline()  # running
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out = first + proc.stdout.read()  # read() through the same buffer: communicate() would skip its contents
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err.decode()
    assert b"Traceback" not in err
    flows, summary = split(ndjson(out))
    assert any(w["code"] == "interrupted" for w in summary["warnings"])
    # The capture being read when Ctrl-C came is flushed (status "interrupted", or "ok" if it was
    # about to end anyway); the ones after it are not started.
    assert summary["inputs"][-1]["status"] in ("interrupted", "ok")
    assert len(summary["inputs"]) < len(list(ndpi.glob("*.pcap*")))
    assert summary["flows"] == len(flows)


def test_garbage_collector_is_paced_by_events_and_forks_get_it_back() -> None:
    """While flows stream the cyclic collector is off, collects every N events, and is on again after; a
    process forked meanwhile (as NFStream forks its meter) has it on."""
    import gc
    import multiprocessing

    assert gc.isenabled()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    collections_before = gc.get_stats()[2]["collections"]
    seen = []
    for i in _gc_paced(iter(range(10)), every=4):
        seen.append((i, gc.isenabled()))
        if i == 5:
            child = ctx.Process(target=lambda: queue.put(gc.isenabled()))
            child.start()
            child.join(30)
    assert seen == [(i, False) for i in range(10)]
    assert gc.isenabled()
    assert gc.get_stats()[2]["collections"] - collections_before >= 2  # full collections at events 4 and 8
    assert queue.get(timeout=30) is True
    # An early stop (a consumer that breaks off) gives the collector back too.
    events = _gc_paced(iter(range(10)))
    next(events)
    assert not gc.isenabled()
    events.close()
    assert gc.isenabled()


class _Warner(Stage):
    """A stage that warns once per source, as the device and scoring stages do when a side pass fails."""

    def end(self, source: SourceInfo) -> None:
        self.warn(source.name, "side_pass", f"{Path(source.name).name}: a stage's warning")


def test_stage_warnings_join_the_summary() -> None:
    out = io.BytesIO()
    analysis = Analysis(NdjsonSink(out), stages=[_Warner()])
    analysis.run_files([SAMPLES / "web-sqli.pcap", SAMPLES / "log4j-exploit.pcap"], main_pass_config("", score=False))
    summary = analysis.finish()
    assert [(w["code"], w["message"]) for w in summary["warnings"]] == [
        ("side_pass", "web-sqli.pcap: a stage's warning"), ("side_pass", "log4j-exploit.pcap: a stage's warning")]
    assert ndjson(out.getvalue())[-1] == orjson.loads(orjson.dumps(summary))


class _Holder(Stage):
    """Lets no flow through until its source ends, as a stage waiting for its side pass may."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        held = list(events)
        self.log.append("released")
        yield from held


class _MeteringProbe(Stage):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def begin(self, source: SourceInfo) -> None:
        self.log.append("begin")

    def metering(self) -> None:
        self.log.append("metering")

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        for event in events:
            if not self.log or self.log[-1] != "flow":
                self.log.append("flow")
            yield event


def test_every_stage_hears_that_the_meter_runs_before_the_stages_ahead_let_a_flow_through() -> None:
    """Stage.metering: the host stage starts its replies pass there, not when the scoring stage (which holds
    flows for its request pass) first lets one through; once per source."""
    log: list[str] = []
    analysis = Analysis(NdjsonSink(io.BytesIO()), stages=[_Holder(log), _MeteringProbe(log)])
    analysis.run_files([SAMPLES / "web-sqli.pcap", SAMPLES / "log4j-exploit.pcap"], main_pass_config("", score=False))
    assert log == ["begin", "metering", "released", "flow"] * 2


class _PacketLog(NFPlugin):
    """Keeps what a side pass's plugins may read of each packet (source.SidePacket), per flow."""

    def on_init(self, packet: Any, flow: Any) -> None:
        flow.udps.packets = []
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        flow.udps.packets.append((packet.direction, packet.time, packet.src_ip, packet.src_mac, packet.ip_packet))


def _flow_log(flow: Any) -> tuple[Any, ...]:
    """What a side pass's reduce may read of a flow (capture.flows.PayloadFlow)."""
    return (flow.src_ip, flow.src_mac, flow.src_port, flow.dst_ip, flow.dst_mac, flow.dst_port, flow.protocol,
            flow.ip_version, flow.vlan_id, flow.bidirectional_first_seen_ms, flow.bidirectional_last_seen_ms,
            flow.bidirectional_duration_ms, flow.bidirectional_packets, flow.bidirectional_bytes, flow.udps.packets)


@pytest.mark.parametrize(("capture", "kind"), [
    ("mirai-c2-irc.pcap", "requests"), ("web-sqli.pcap", "requests"), ("dns-tunnel-dnscat2.pcap", "requests"),
    ("hue-bridge-setup.pcap", "identity"), ("tplink-hs110-setup.pcap", "identity"),
    ("edimax-sp2101w-setup.pcap", "identity"), ("edimax-sp2101w-setup.pcap", "log"), ("web-sqli.pcap", "log")])
def test_side_passes_give_what_nfstream_own_flows_give(capture: str, kind: str) -> None:
    # a side pass's flows (capture.flows.PayloadFlow: endpoints copied once, a small packet for the plugins) hand its
    # plugins and reduce what NFStream's own streamer and NFlow hand them, flow for flow and packet for packet
    from nfstream import NFStreamer

    from iotscan.capture.side_pass import bpf_forms, side_pass
    from iotscan.capture.source import MeterConfig
    from iotscan.detect import request_pass
    from iotscan.devices import identity

    if kind == "requests":
        bpf, plugin, reduce, snaplen = (request_pass.REQUEST_FILTER, request_pass.RequestPlugin, request_pass._match,
                                        request_pass.MAX_HEAD_BYTES + 128)
    elif kind == "identity":
        bpf, plugin, reduce, snaplen = identity.IDENTITY_FILTER, identity.IdentityPlugin, identity._hints, 2048
    else:  # every packet, both directions
        bpf, plugin, reduce, snaplen = "ip", _PacketLog, _flow_log, 1536
    path = str(SAMPLES / capture)
    config = MeterConfig(source=path)
    ours = side_pass("test", path, config, bpf, plugin(), list, snaplen=snaplen, reduce=reduce).outcome()
    streamer = NFStreamer(source=path, bpf_filter=bpf_forms(bpf)[0], udps=plugin(), n_dissections=0,
                          statistical_analysis=False, snapshot_length=snaplen, idle_timeout=config.idle_timeout,
                          active_timeout=config.active_timeout, n_meters=1)
    theirs = [kept for kept in map(reduce, streamer) if kept is not None]
    assert ours and sorted(map(repr, ours)) == sorted(map(repr, theirs))
    if kind == "log":  # the captures have packets both ways
        assert {direction for flow in ours for direction, *_ in flow[-1]} == {0, 1}


_WRITER = """
import signal, sys
from iotscan.cli.common import open_output
signal.signal(signal.SIGINT, lambda signum, frame: None)  # as analyze's Ctrl-C handler: note it, go on
out = open_output(None)
block = b"".join(b"%08d" % i + b"x" * 191 + b"\\n" for i in range(1000))  # 200,000 bytes of records
print("ready", file=sys.stderr, flush=True)
out.write(block)
out.flush()
"""


def test_a_signal_during_a_large_write_to_a_full_pipe_loses_nothing() -> None:
    """Ctrl-C while a block of records is written to a full pipe (a worker's records in `analyze --jobs`):
    Python's buffered writer returns after the first 64 KiB, and the rest must still be written, whole."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None and proc.stderr.readline() == b"ready\n"
    time.sleep(1.0)  # the pipe is full (nobody reads it yet): the write blocks
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    lines = out.splitlines()
    assert len(out) == 200_000 and [int(line[:8]) for line in lines] == list(range(1000))
