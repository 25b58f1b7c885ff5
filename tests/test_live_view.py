"""The live view shows what is talking now: a long-lived flow on `lo` appears in the meter's snapshots of the
busiest active flows, and in the view, seconds before its record is written (it ends long after).

All traffic is a bounded TCP stream between two sockets of 127.0.0.1, on ports the test owns and filters on.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.cli.common import main_pass_config
from iotscan.live import LiveLimits, LiveRun
from iotscan.output.records import MeteredFlow, metered_flow
from iotscan.output.sinks import NdjsonSink
from tests.conftest import REPO

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="live capture on lo needs root (CAP_NET_RAW)"),
]

CHUNK = 4096


class Stream:
    """A TCP connection on 127.0.0.1 that carries CHUNK bytes every 50 ms while ``running``, for at most
    ``limit_s`` seconds: a long-lived, busy flow."""

    def __init__(self, limit_s: float = 30.0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.limit_s = limit_s
        self.running = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.running.set()
        self.thread.start()

    def _run(self) -> None:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        server, _ = self.listener.accept()
        server.settimeout(5)
        deadline = time.monotonic() + self.limit_s
        try:
            while self.running.is_set() and time.monotonic() < deadline:
                client.sendall(b"x" * CHUNK)
                got = 0
                while got < CHUNK:
                    got += len(server.recv(CHUNK))
                self.sent += CHUNK
                time.sleep(0.05)
        finally:  # the connection is left open: its flow ends only when the capture stops
            self.socks = (client, server)

    def stop(self) -> None:
        self.running.clear()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        for s in (*getattr(self, "socks", ()), self.listener):
            s.close()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_meter_snapshots_show_a_long_lived_flow_before_it_ends() -> None:
    stream = Stream()
    config = MeterConfig(source="lo", live=True, bpf=f"tcp port {stream.port}", statistics=False,
                         reduce=metered_flow, item_type=MeteredFlow, active_every_ms=500)
    source = FlowSource(config, heartbeat=True)
    ended: list = []
    reader = threading.Thread(target=lambda: ended.extend(f for f in source if f is not None), daemon=True)
    reader.start()
    try:
        _wait(lambda: source.pid is not None and source.active is not None, 30, "the meter's first snapshot")
        stream.start()

        def ours() -> list:
            snapshot = source.active
            return [f for f in snapshot.flows if stream.port in (f.src_port, f.dst_port)] if snapshot else []

        _wait(lambda: ours() and ours()[0].packets > 20, 20, "the stream in a snapshot")
        (flow,) = ours()
        snapshot = source.active
        assert not ended  # no flow record yet: the flow goes on
        assert (flow.src_ip, flow.dst_ip, flow.dst_port, flow.protocol) == ("127.0.0.1", "127.0.0.1", stream.port, 6)
        assert 0 < flow.recent_bytes <= flow.bytes and 0 < flow.recent_packets <= flow.packets
        # the window is about a second of the stream: 10 to 20 chunks of 4 KB each way... of one direction
        assert 400 <= snapshot.window_ms <= 1500 and CHUNK <= flow.recent_bytes < 40 * CHUNK
        assert snapshot.active >= 1 and snapshot.scanned >= 1 and len(snapshot.flows) <= 10
        later = snapshot.at_ms
        _wait(lambda: source.active.at_ms > later, 5, "the next snapshot")
        assert not ended
    finally:
        stream.stop()
        source.stop()
        reader.join(timeout=20)
    assert [f.dst_port for f in ended] == [stream.port]  # its record came when the capture stopped


def test_live_view_renders_the_active_flow_and_the_record_comes_at_its_end() -> None:
    stream = Stream()
    out = io.BytesIO()
    config = main_pass_config("lo", score=False, live=True, bpf=f"tcp port {stream.port}")
    run = LiveRun(NdjsonSink(out), [], config, LiveLimits(), view_console=Console(file=io.StringIO(), width=120),
                  vendor=lambda mac: "Loopback" if mac == "00:00:00:00:00:00" else None)
    runner = threading.Thread(target=run.run, daemon=True)
    runner.start()
    try:
        _wait(lambda: run.active() is not None, 30, "the meter's first snapshot")
        stream.start()
        _wait(lambda: run.active() is not None and any(stream.port == f.dst_port for f in run.active().flows), 20,
              "the stream in a snapshot")
        text = io.StringIO()
        Console(file=text, width=120).print(run._render())
        view = text.getvalue()
        assert b'"flow"' not in out.getvalue()  # not written yet
    finally:
        stream.stop()
        run.stop("signal")
        runner.join(timeout=30)
    assert "Active now: the busiest flows of the last second" in view
    row = next(line for line in view.splitlines() if f"127.0.0.1:{stream.port}" in line)
    assert "TCP" in row.upper() and "Loopback 00:00:00:00:00:00" in row and "KB" in row
    records = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [r["dst_port"] for r in records if r["event_type"] == "flow"] == [stream.port]


@contextmanager
def _pty(columns: int, rows: int) -> Iterator[tuple[int, int]]:
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        yield parent, child
    finally:
        os.close(parent)
        os.close(child) if _is_open(child) else None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def test_live_cli_view_on_a_terminal_shows_the_active_flow(tmp_path: Path) -> None:
    """`iotscan live lo -o FILE` on a terminal (a pty of 120 columns): the view on stderr names the busy flow
    while the file has no record of it yet."""
    stream = Stream()
    output = tmp_path / "live.ndjson"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("IOTSCAN_DEBUG", None)
    with _pty(120, 40) as (parent, child):
        proc = subprocess.Popen([sys.executable, "-m", "iotscan", "live", "lo", "--bpf", f"tcp port {stream.port}",
                                 "--duration", "25", "--no-score", "--no-devices", "-o", str(output)],
                                cwd=REPO, env=env, stdin=child, stdout=child, stderr=child, close_fds=True)
        os.close(child)
        seen = ""
        shown_at = None
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and shown_at is None:
                ready, _, _ = select.select([parent], [], [], 0.2)
                if ready:
                    try:
                        seen += os.read(parent, 65536).decode(errors="replace")
                    except OSError:
                        break
                text = _ANSI.sub("", seen)
                if "iotscan live lo" in text and not stream.running.is_set():  # the view runs: send
                    stream.start()
                if f"127.0.0.1:{stream.port}" in text:
                    shown_at = time.monotonic()
                    flows_then = [orjson.loads(line) for line in output.read_bytes().splitlines()
                                  if b'"flow"' in line] if output.exists() else []
        finally:
            stream.stop()
            proc.terminate()  # as SIGTERM: stops cleanly, flushes the active flows
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            while _is_open(parent) and select.select([parent], [], [], 0.2)[0]:
                try:
                    seen += os.read(parent, 65536).decode(errors="replace")
                except OSError:
                    break
    assert shown_at is not None, _ANSI.sub("", seen)[-3000:]
    assert flows_then == []  # shown in the view, not written yet: the flow was still going on
    assert proc.returncode == 0, _ANSI.sub("", seen)[-2000:]
    assert "Traceback" not in seen
    records = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert [r["dst_port"] for r in records if r["event_type"] == "flow"] == [stream.port]
    assert records[-1]["event_type"] == "summary" and records[-1]["stop_reason"] == "signal"
