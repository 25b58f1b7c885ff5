"""Regenerate the screenshots in docs/screenshots/ from real runs through a pty (a terminal of that size).

    python docs/screenshots/make.py            # from the repository, with iotscan's dependencies installed

* analyze-80.svg, analyze-120.svg: `iotscan analyze samples/` on a terminal of 80 and 120 columns, from the
  start to the devices table (the attacks, their reasons and the inspect command);
* live-100.svg (as root: it captures on `lo`): `iotscan live lo --idle-timeout 2` while a TCP stream
  between two local sockets runs and a path-traversal request goes to another local socket, the view's
  last frame.

The terminal's output (ANSI colours and all) is turned into SVG by Rich (Console.save_svg).
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
from pathlib import Path

from rich.console import Console
from rich.text import Text

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def run_on_pty(argv: list[str], columns: int, rows: int = 60, while_running=None, timeout: float = 120) -> str:
    """The command's terminal output (stdout and stderr on one pty of ``columns`` x ``rows``)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "COLUMNS": str(columns)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    chunks: list[bytes] = []
    helper = threading.Thread(target=while_running, daemon=True) if while_running else None
    if helper:
        helper.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([parent], [], [], 0.2)
        if ready:
            try:
                data = os.read(parent, 65536)
            except OSError:  # the command ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(parent)
    if helper:
        helper.join(timeout=30)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def save_svg(ansi: str, columns: int, title: str, path: Path) -> None:
    console = Console(record=True, width=columns, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(Text.from_ansi(ansi.rstrip("\n")), overflow="fold")  # a long command wraps, as on a terminal
    console.save_svg(str(path), title=title)
    print(f"{path.relative_to(REPO)}: {path.stat().st_size / 1024:.0f} KiB")


def analyze(columns: int) -> None:
    out = run_on_pty([sys.executable, "-m", "iotscan", "analyze", "samples/", "--quiet"], columns)
    lines = out.split("\n")
    end = next(i for i, line in enumerate(lines) if re.sub(r"\x1b\[[0-9;]*m", "", line).strip() == "Devices")
    save_svg("\n".join(lines[:end]), columns, f"iotscan analyze samples/  ({columns} columns)",
             HERE / f"analyze-{columns}.svg")


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock


def _exchange(listener: socket.socket, request: bytes, answer: bytes) -> None:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    client.sendall(request)
    server.recv(65536)
    server.sendall(answer)
    client.recv(65536)
    client.close()
    server.close()


def live(columns: int) -> None:
    bulk, web = _listener(), _listener()

    def traffic() -> None:  # loopback only, bounded: 8 s of a stream, two HTTP exchanges
        time.sleep(3)
        client = socket.create_connection(bulk.getsockname(), timeout=5)
        server, _ = bulk.accept()
        stop = time.monotonic() + 8
        sent_attack = False
        while time.monotonic() < stop:
            client.sendall(b"x" * 8192)
            got = 0
            while got < 8192:
                got += len(server.recv(8192))
            time.sleep(0.02)
            if not sent_attack and time.monotonic() > stop - 6:
                sent_attack = True
                _exchange(web, b"GET /cgi-bin/../../../../etc/passwd HTTP/1.1\r\nHost: cam\r\n\r\n",
                          b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                _exchange(web, b"GET /index.html HTTP/1.1\r\nHost: cam\r\n\r\n",
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        client.close()
        server.close()

    ports = " or ".join(f"tcp port {s.getsockname()[1]}" for s in (bulk, web))
    out = run_on_pty([sys.executable, "-m", "iotscan", "live", "lo", "--bpf", ports, "--idle-timeout", "2",
                      "--duration", "10", "-o", os.devnull], columns, rows=40, while_running=traffic)
    bulk.close()
    web.close()
    # the view redraws itself in place (cursor up, erase line): keep its last whole frame
    frames = [f for f in re.split(r"(?:\x1b\[2K)?(?:\x1b\[1A\x1b\[2K)+", out) if "Active now" in f]
    frame = re.sub(r"\x1b\[[0-9]*[ABCDGJK]|\x1b\[\?25[hl]|\r", "", frames[-1]) if frames else out
    save_svg(frame, columns, f"iotscan live lo  ({columns} columns)", HERE / f"live-{columns}.svg")


if __name__ == "__main__":
    for width in (80, 120):
        analyze(width)
    if os.geteuid() == 0:
        live(100)
    else:
        print("live-100.svg: not regenerated (capturing on lo needs root)")
