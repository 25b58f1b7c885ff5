"""Running tshark (and editcap): finding them, supervising the child processes, selecting the flow's
frames with a display filter and dissecting only those into pyshark packets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from iotscan.errors import CaptureError, InputError
from iotscan.inspect.selection import MARKER_SLACK_MS, FlowLookup, flows_end_ms, flows_filter

INSTALL_HINT = "install it with: sudo apt-get install tshark (or run ./install.sh)"
TSHARK_ENV = "IOTSCAN_TSHARK"  # explicit path to tshark, for installs outside PATH
_READ_CHUNK = 1 << 16
_EXIT_WAIT_S = 10.0  # after tshark closed its output, how long it may take to exit
_KILL_WAIT_S = 2.0


# -- tshark ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """The Wireshark programs inspect runs: tshark, and editcap (same package) to cut the flow's frames out."""

    tshark: str
    editcap: str


def find_tshark() -> Tools:
    """tshark ($IOTSCAN_TSHARK if set, else the first on PATH) and the editcap beside it or on PATH;
    CaptureError (exit 3) when either is missing."""
    explicit = os.environ.get(TSHARK_ENV)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise CaptureError(f"tshark not found: {TSHARK_ENV}={explicit} is not an executable file; "
                               f"`iotscan inspect` reads packets through tshark: {INSTALL_HINT}")
        tshark = explicit
    else:
        found = shutil.which("tshark")
        if found is None:
            raise CaptureError(f"tshark is not installed (not on PATH): `iotscan inspect` reads packets through "
                               f"tshark; {INSTALL_HINT}")
        tshark = found
    editcap = shutil.which("editcap", path=os.path.dirname(tshark)) or shutil.which("editcap")
    if editcap is None:
        raise CaptureError(f"editcap (a Wireshark tool, installed with tshark) is not on PATH: {INSTALL_HINT}")
    return Tools(tshark, editcap)


def _load_pdml_parser() -> Any:
    try:
        from pyshark.tshark.output_parser.tshark_xml import packet_from_xml_packet
    except ImportError as exc:
        raise CaptureError(f"pyshark is not importable ({exc}): reinstall iotscan (pip install iotscan)") from exc
    return packet_from_xml_packet


_FILTER_TIME_ERROR = re.compile(r"frame\.time|time offset|absolute time|not a valid", re.I)
_TRUNCATED = ("cut short in the middle of a packet", "appears to be damaged or corrupt")
_UNREADABLE = ("isn't a capture file in a format", "unknown file type", "doesn't support", "isn't supported",
               "is a named pipe", "is a directory")


class _Child:
    """A tshark or editcap child: stdout read in chunks, stderr kept in a temporary file.

    Always reaped: ``close()`` terminates it and kills it if it does not go within two seconds, or
    at once when interrupted while waiting (a second Ctrl-C). Its own session: a terminal's Ctrl-C
    reaches iotscan, which then ends it.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.name = os.path.basename(argv[0])
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the child; closed in close()
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True)
        except OSError as exc:
            self.stderr.close()
            raise CaptureError(f"cannot run {self.name} ({argv[0]}): {exc.strerror or exc}; {INSTALL_HINT}") from exc

    def chunks(self) -> Iterator[bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, _READ_CHUNK):
            yield chunk

    def lines(self) -> Iterator[bytes]:
        rest = b""
        for chunk in self.chunks():
            rest += chunk
            *complete, rest = rest.split(b"\n")
            yield from complete
        if rest:
            yield rest

    def finish(self) -> tuple[int, str]:
        """Wait for the exit after the end of output: (exit code, the last lines of stderr)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            raise CaptureError(f"{self.name} closed its output but did not exit within {_EXIT_WAIT_S:.0f} s") from None
        self.stderr.seek(0)
        text = self.stderr.read()[-8192:].decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and "This could be dangerous" not in line and not line.strip().startswith("^")]
        return code, " ".join(lines[-3:]).removeprefix(f"{self.name}: ")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=_KILL_WAIT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=_KILL_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                if proc.poll() is None:  # interrupted while waiting: no mercy
                    with contextlib.suppress(OSError):
                        proc.kill()
                if proc.stdout is not None:
                    proc.stdout.close()
        self.stderr.close()


def _check(capture: str, child: _Child, outputs: int) -> str | None:
    """After a child's output ended: None if it went well, a warning if the capture ends in damage (the output
    before the damage is good), "rejected" if tshark refused the ISO 8601 time filter; raises otherwise."""
    code, message = child.finish()
    if code == 0:
        return None
    if code < 0:
        raise CaptureError(f"{capture}: {child.name} was killed by signal {-code}")
    lowered = message.lower()
    if any(s in lowered for s in _TRUNCATED):
        return f"{child.name} stopped at damage in the capture: {message}"
    if any(s in lowered for s in _UNREADABLE):
        raise InputError(f"{capture}: {child.name} cannot read this capture: {message}")
    if outputs == 0 and child.name.startswith("tshark") and _FILTER_TIME_ERROR.search(message):
        return "rejected"
    raise CaptureError(f"{capture}: {child.name} failed: {message or f'exit code {code}'}")


@dataclass
class ReadStats:
    """What the tshark passes did, for warnings and the summary record."""

    display_filter: str = ""
    packets: int = 0  # packet records produced
    expected: int = 0  # packets the flow records count
    limited: bool = False  # --limit reached
    warnings: list[str] = field(default_factory=list)


def select_frames(tools: Tools, capture: str, lookup: FlowLookup, stats: ReadStats, *, limit: int = 0,
                  any_time: bool = False) -> list[int]:
    """The frame numbers of the flows' packets, from tshark reading the capture with their display filter.

    tshark prints a summary line of two columns (frame number, epoch time) per matching packet, so it
    dissects as cheaply as a plain ``tshark -Y`` does: PDML or ``-T fields`` output make it build the
    full protocol tree of every packet of the capture, which costs twice as much.
    Ends tshark after ``limit`` frames, or when it has read past the flows' end (see flows_filter).
    """
    flows = lookup.flows
    end_ms = flows_end_ms(flows) + (0 if lookup.saw_every_packet else MARKER_SLACK_MS)
    frames: list[int] = []
    for syntax in ("iso", "epoch"):
        stats.display_filter = flows_filter(flows, syntax, any_time, marker_after_ms=end_ms)
        child = _Child([tools.tshark, "-n", "-l", "-r", capture, "-Y", stats.display_filter, *_NUMBER_AND_TIME])
        try:
            complete = True
            for line in child.lines():
                number, _, when = line.strip().partition(b" ")
                if not any_time and _timestamp_ms(when.strip().decode()) >= end_ms:
                    break  # the marker packet: the flows are complete
                frames.append(int(number))
                if limit and len(frames) >= limit:
                    stats.limited = True
                    break
            else:
                outcome = _check(capture, child, len(frames))
                complete = outcome != "rejected"
                if outcome and complete:
                    stats.warnings.append(outcome)
        finally:
            child.close()
        if complete:
            return frames
    raise CaptureError(f"{capture}: tshark rejected the display filter {stats.display_filter!r}")


_NUMBER_AND_TIME = ("-t", "e", "-o", 'gui.column.format:"No.","%m","Time","%t"')  # summary columns
_EDITCAP_RANGES = 20_000  # frame ranges per editcap call: keeps the command line short


def dissect_frames(tools: Tools, capture: str, frames: list[int]) -> Iterator[tuple[Any, list[int]]]:
    """Each frame as a pyshark Packet, in order: editcap cuts the frames out of the capture into a temporary
    file (no dissection: fast) and tshark dissects only them into PDML for pyshark. With each Packet, the
    capture's frame numbers of the extract it comes from (the Packet's frame numbers count in the extract)."""
    parse = _load_pdml_parser()
    with tempfile.TemporaryDirectory(prefix="iotscan-inspect-") as tmp:
        ranges = _ranges(frames)
        for start in range(0, len(ranges), _EDITCAP_RANGES):
            batch = ranges[start:start + _EDITCAP_RANGES]
            numbers = [n for first, last in batch for n in range(first, last + 1)]
            part = os.path.join(tmp, "flow")  # editcap writes the capture's own format
            editcap = _Child([tools.editcap, "-r", capture, part,
                              *(str(a) if a == b else f"{a}-{b}" for a, b in batch)])
            try:
                for _ in editcap.chunks():
                    pass
                _check(capture, editcap, 0)  # a capture damaged further on: the frames before it are written
            finally:
                editcap.close()
            for packet in _pdml_packets(tools, capture, part, parse):
                yield packet, numbers


def _pdml_packets(tools: Tools, capture: str, part: str, parse: Any) -> Iterator[Any]:
    child = _Child([tools.tshark, "-n", "-l", "-r", part, "-T", "pdml"])
    buf = b""
    scanned = 0  # buf[:scanned] holds no end tag: don't search it again
    start_tag, end_tag = b"<packet>", b"</packet>"
    count = 0
    try:
        for chunk in child.chunks():
            buf += chunk
            while (end := buf.find(end_tag, scanned)) >= 0:
                stop = end + len(end_tag)
                xml, buf, scanned = buf[buf.find(start_tag):stop], buf[stop:], 0
                count += 1
                yield parse(xml)
            scanned = max(len(buf) - len(end_tag), 0)
        warning = _check(capture, child, count)
        if warning and warning != "rejected":
            raise CaptureError(f"{capture}: tshark could not dissect the flow's packets: {warning}")
    finally:
        child.close()


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted frame numbers as (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def _timestamp_ms(raw: str) -> int:
    """tshark's epoch time text (``1472729311.407793``) in milliseconds."""
    secs, _, frac = str(raw).partition(".")
    return int(secs) * 1000 + int((frac + "000")[:3])
