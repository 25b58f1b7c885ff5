"""Finding the captures a user pointed at, recognised by their magic bytes, not their names.

iotscan reads a capture more than once (the main pass and the side passes), so what can be read only once
-- stdin ("-"), a pipe or FIFO -- and what libpcap cannot read -- a gzip, bzip2 or xz compressed capture --
is first copied, decompressed, to a temporary file (removed after its analysis). Ctrl-C during the copy of
a stream ends the stream there, as it ends `tcpdump -w - | iotscan analyze -`: what came is analysed; during
the decompression of a file it stops the copy at once (see CopyInterrupted).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import stat
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from iotscan.errors import InputError

# Link types NFStream's packet parser understands (pcap LINKTYPE_* values as stored in files).
SUPPORTED_LINK_TYPES = {0, 1, 9, 12, 14, 50, 101, 104, 113, 127, 228, 229}
LINK_TYPE_NAMES = {
    0: "NULL",
    1: "ETHERNET",
    9: "PPP",
    50: "PPP_HDLC",
    101: "RAW",
    104: "C_HDLC",
    105: "IEEE802_11",
    113: "LINUX_SLL",
    119: "PRISM",
    127: "IEEE802_11_RADIOTAP",
    143: "DOCSIS",
    147: "USER0",
    163: "AVS",
    192: "PPI",
    195: "IEEE802_15_4",
    220: "USB_LINUX_MMAPPED",
    228: "IPV4",
    229: "IPV6",
    276: "LINUX_SLL2",
}

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": "<",  # microsecond, little-endian
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanosecond
    b"\xa1\xb2\x3c\x4d": ">",
    b"\x34\xcd\xb2\xa1": "<",  # Kuznetzov's modified pcap
    b"\xa1\xb2\xcd\x34": ">",
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_PCAPNG_IDB, _PCAPNG_PACKET_BLOCKS = 1, {2, 3, 6}
_MAX_HEADER_SCAN = 1 << 20  # pcapng: look for interface blocks in the first MiB only


def link_type_name(link_type: int) -> str:
    return f"{link_type} ({LINK_TYPE_NAMES.get(link_type, 'unknown')})"


# Compressed files by their magic bytes: the kind, and how to read them decompressed.
_COMPRESSED: dict[bytes, tuple[str, Callable[[Path], IO[bytes]]]] = {
    b"\x1f\x8b": ("gzip", gzip.open),
    b"BZh": ("bzip2", bz2.open),
    b"\xfd7zXZ\x00": ("xz", lzma.open),
}
# What reading a damaged compressed stream (or a failing pipe) raises: the part before the damage is kept.
_DAMAGED_STREAM = (EOFError, zlib.error, lzma.LZMAError, OSError)
_SPOOL_CHUNK = 1 << 20
STDIN = "-"


@dataclass(frozen=True)
class CaptureFile:
    path: Path  # what libpcap opens: the file itself, or its temporary copy when spooled
    format: str  # "pcap" or "pcapng"
    link_types: tuple[int, ...]
    size: int
    name: str = ""  # as the user gave it, when ``path`` is a temporary copy of it ("-", a pipe, a .gz file)
    spooled: bool = False  # ``path`` is a temporary copy, to remove once analysed
    warning: str = ""  # what went wrong while copying it (a damaged compressed stream)
    cut: bool = False  # a stream that Ctrl-C ended while it was copied: what came before is analysed

    @property
    def display_name(self) -> str:
        return self.name or str(self.path)

    @property
    def unsupported_link_types(self) -> tuple[int, ...]:
        return tuple(lt for lt in self.link_types if lt not in SUPPORTED_LINK_TYPES)


@dataclass(frozen=True)
class InputProblem:
    """A path that could not be used; reported, while the other inputs still run."""

    path: str
    message: str


def _capture_format(head: bytes) -> str | None:
    if head[:4] in _PCAP_MAGICS:
        return "pcap"
    if head[:4] == _PCAPNG_SHB:
        return "pcapng"
    return None


def _pcapng_link_types(f, head: bytes) -> tuple[int, ...]:
    if len(head) < 12 or head[8:12] not in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
        raise InputError("not a valid pcapng capture (bad section header)")
    endian = "<" if head[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    link_types: list[int] = []
    offset = 0
    f.seek(0)
    while offset < _MAX_HEADER_SCAN:
        block = f.read(12)
        if len(block) < 12:
            break
        block_type, block_len = struct.unpack(endian + "II", block[:8])
        if block_type in _PCAPNG_PACKET_BLOCKS:
            break
        if block_type == _PCAPNG_IDB:
            link_types.append(struct.unpack(endian + "H", block[8:10])[0])
        if block_len < 12 or block_len % 4:
            break  # corrupt: libpcap will report it while reading
        offset += block_len
        f.seek(offset)
    return tuple(link_types)


def sniff(path: Path) -> CaptureFile:
    """Identify a capture file by its magic bytes; raise InputError with a one-line reason."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
            fmt = _capture_format(head)
            if size == 0:
                raise InputError("empty file (0 bytes)")
            if fmt is None:
                compressed = _compressed(head)
                if compressed:  # capture_file decompresses once: this one was compressed twice
                    raise InputError(f"compressed file ({compressed[0]}): decompress it first")
                raise InputError(f"not a pcap or pcapng capture (magic bytes {head[:4].hex() or 'none'})")
            if fmt == "pcap":
                if len(head) < 24:
                    raise InputError("truncated capture: the pcap file header is incomplete")
                endian = _PCAP_MAGICS[head[:4]]
                link_types: tuple[int, ...] = (struct.unpack(endian + "I", head[20:24])[0] & 0xFFFF,)
            else:
                link_types = _pcapng_link_types(f, head)
    except IsADirectoryError as exc:
        raise InputError("is a directory") from exc
    except FileNotFoundError as exc:
        raise InputError("no such file") from exc
    except PermissionError as exc:
        raise InputError("permission denied") from exc
    except OSError as exc:
        raise InputError(exc.strerror or str(exc)) from exc
    capture = CaptureFile(path=path, format=fmt, link_types=link_types, size=size)
    if link_types and not (set(link_types) & SUPPORTED_LINK_TYPES):
        names = ", ".join(link_type_name(lt) for lt in link_types)
        raise InputError(f"unsupported link type {names}: iotscan reads Ethernet, raw IP, Linux cooked (v1), "
                         "loopback, PPP and radiotap captures")
    return capture


def _looks_like_capture(path: Path) -> bool:
    """A capture by its first bytes, compressed or not (a directory's other files, logs.gz included, are not)."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
        if _capture_format(head[:4]) is not None:
            return True
        compressed = _compressed(head)
        if compressed is None:
            return False
        with compressed[1](path) as stream:
            return _capture_format(stream.read(4)) is not None
    except _DAMAGED_STREAM:
        return False


def _compressed(head: bytes) -> tuple[str, Callable[[Path], IO[bytes]]] | None:
    """The compression a file's first bytes show (its kind and opener), or None."""
    return next((kind for magic, kind in _COMPRESSED.items() if head.startswith(magic)), None)


# Told of each copy as it starts: the name given, and how many bytes are copied so far (for a progress bar).
OnCopy = Callable[[str, Callable[[], int]], None]


class CopyInterrupted(Exception):
    """Raised by a Ctrl-C handler (pipeline.interruptible) while copy_in_progress(), to end the copy: a read
    from a pipe blocks until its writer writes again, and Python retries a read its signal handler let be."""


_copying = False  # a copy's read loop runs (in the main thread, where signal handlers run too)


def copy_in_progress() -> bool:
    return _copying


def spool(stream: IO[bytes], name: str, what: str, on_copy: OnCopy | None = None,
          keep_cut: bool = False) -> CaptureFile | InputProblem:
    """Copy a stream (stdin, a pipe, a decompressing reader) to a temporary file, a chunk at a time, and sniff
    the copy. A stream damaged part way keeps what came before the damage, with a warning; one that Ctrl-C
    ends (CopyInterrupted) keeps what came if ``keep_cut`` (a stream that only Ctrl-C ends), else the copy is
    dropped."""
    try:
        fd, tmp = tempfile.mkstemp(prefix="iotscan-", suffix=".cap")
    except OSError as exc:  # no writable temporary directory at all
        return InputProblem(name, f"cannot copy {what} to a temporary file: {exc.strerror or exc}")
    path = Path(tmp)
    try:
        return _copy(stream, fd, path, name, what, on_copy, keep_cut)
    except BaseException:  # a second Ctrl-C while copying
        path.unlink(missing_ok=True)
        raise


def _copy(stream: IO[bytes], fd: int, path: Path, name: str, what: str,
          on_copy: OnCopy | None, keep_cut: bool) -> CaptureFile | InputProblem:
    global _copying
    # read1: what one read of the source gives, so that little is lost when a later one fails
    read = getattr(stream, "read1", stream.read)
    damage: Exception | None = None
    problem = ""
    cut = False
    head = b""
    size = 0
    if on_copy is not None:
        on_copy(name, lambda: size)
    with os.fdopen(fd, "wb", buffering=0) as out:  # chunks are large: no buffer, so a failed write shows here
        try:
            _copying = True
            while True:
                try:
                    chunk = read(_SPOOL_CHUNK)
                except _DAMAGED_STREAM as exc:
                    damage = exc
                    break
                if not chunk:
                    break
                try:
                    view = memoryview(chunk)
                    while view:  # an unbuffered write may take part of it
                        view = view[out.write(view):]
                except OSError as exc:
                    problem = f"cannot copy {what} to a temporary file in {tempfile.gettempdir()}: " \
                              f"{exc.strerror or exc}"
                    break
                size += len(chunk)
                if len(head) < 4:
                    head += chunk[:4]
                    if len(head) >= 4 and _capture_format(head) is None:
                        break  # not a capture (sniff says so from the first bytes): the rest need not be copied
        except CopyInterrupted:
            cut = True
            problem = "" if keep_cut else "interrupted by the user"
        finally:
            _copying = False
    if cut:
        size = path.stat().st_size  # the exception may have come between a write and its count
    if not problem and not size:
        problem = f"cannot read {what}: {damage}" if damage else f"{what} is empty (0 bytes)"
    if not problem:
        try:
            warning = f"{what} is damaged after {size:,} bytes ({damage}): flows up to the damage are reported" \
                if damage else ""
            return replace(sniff(path), name=name, spooled=True, warning=warning, cut=cut)
        except InputError as exc:
            problem = exc.message
    path.unlink(missing_ok=True)
    return InputProblem(name, problem)


def _spooled(raw: str | os.PathLike[str], path: Path, on_copy: OnCopy | None) -> CaptureFile | InputProblem | None:
    """stdin, a pipe or a compressed file, copied to a temporary file; None for anything else."""
    if str(raw) == STDIN:
        if sys.stdin is None or sys.stdin.isatty():
            return InputProblem(STDIN, "stdin is a terminal: pipe a capture into iotscan, e.g. "
                                       "zcat capture.pcap.gz | iotscan analyze -")
        return spool(sys.stdin.buffer, STDIN, "stdin", on_copy, keep_cut=True)
    try:
        mode = path.stat().st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):  # a pipe, a FIFO, /dev/stdin: readable once
            with path.open("rb") as stream:
                return spool(stream, str(path), "the pipe", on_copy, keep_cut=True)
        if stat.S_ISREG(mode):
            with path.open("rb") as f:
                compressed = _compressed(f.read(6))
            if compressed is not None:
                kind, opener = compressed
                with opener(path) as stream:
                    return spool(stream, str(path), f"the {kind} stream", on_copy)
    except OSError:
        return None  # not there, not readable...: sniff says which
    return None


def is_url(raw: str | os.PathLike[str]) -> bool:
    """A URL of fsspec's filesystems (s3://, gs://, hdfs://, http://, file://...) rather than a local path."""
    return isinstance(raw, str) and _URL.match(raw) is not None


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def listed(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str | InputProblem]:
    """The captures the paths name, one by one, not opened beyond their first bytes: directories walked
    (recursively, sorted; files that are not captures, plain or compressed, skipped silently: a capture directory
    often holds logs and notes beside the pcaps), files and URLs as given. open_capture() opens each."""
    for raw in paths:
        if is_url(raw):
            yield from _listed_url(str(raw))
            continue
        path = Path(raw)
        if path.is_dir():
            found = False
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    child = Path(root) / name
                    if not child.is_file() or not _looks_like_capture(child):  # a FIFO there would block
                        continue
                    found = True
                    yield str(child)
            if not found:
                yield InputProblem(str(path), "directory holds no pcap or pcapng captures (plain or compressed)")
            continue
        yield str(raw)


def expand(paths: Iterable[str | os.PathLike[str]], on_copy: OnCopy | None = None
           ) -> Iterator[CaptureFile | InputProblem]:
    """Yield each capture named by the paths (see listed), opened, or the problem with it.

    Files named explicitly must be captures; inside directories, files that are not captures are skipped."""
    for item in listed(paths):
        yield item if isinstance(item, InputProblem) else open_capture(item, on_copy)


def open_capture(raw: str, on_copy: OnCopy | None = None) -> CaptureFile | InputProblem:
    """A file or URL of listed(), ready for libpcap (copied first if it must be), or the problem with it."""
    return fetch_url(raw, on_copy) if is_url(raw) else capture_file(raw, on_copy)


def capture_file(raw: str | os.PathLike[str], on_copy: OnCopy | None = None) -> CaptureFile | InputProblem:
    """The capture a path (not a directory) names, copied first if it must be (see the module), or the problem."""
    path = Path(raw)
    spooled = _spooled(raw, path, on_copy)
    if spooled is not None:
        return spooled
    try:
        return sniff(path)
    except InputError as exc:
        return InputProblem(str(path), exc.message)


# -- URLs, through fsspec (the `cluster` extra installs it with Dask) --------------------------------------

_HEAD_BYTES = 1 << 16  # of an object, to tell a capture (compressed or not) from another file


def _filesystem(url: str):  # -> (fsspec filesystem, path in it), or an InputProblem
    try:
        import fsspec
    except ImportError:
        return InputProblem(url, "reading URLs needs fsspec: pip install 'iotscan[cluster]'")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # no implementation for the protocol (s3fs, gcsfs... not installed)
        return InputProblem(url, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _listed_url(url: str) -> Iterator[str | InputProblem]:
    found = _filesystem(url)
    if isinstance(found, InputProblem):
        yield found
        return
    fs, path = found
    try:
        if not fs.isdir(path):
            yield url
            return
        children = sorted(fs.find(path))
    except Exception as exc:  # the filesystem's own errors (credentials, network): one line for the user
        yield InputProblem(url, _one_line(exc))
        return
    found_one = False
    for child in children:
        try:
            head = fs.cat_file(child, start=0, end=_HEAD_BYTES)
        except Exception:  # unreadable objects are skipped, as unreadable files of a directory are
            continue
        if _head_is_capture(head):
            found_one = True
            yield fs.unstrip_protocol(child)
    if not found_one:
        yield InputProblem(url, "directory holds no pcap or pcapng captures (plain or compressed)")


def _head_is_capture(head: bytes) -> bool:
    """Whether a file's first bytes are a capture's, or a compressed capture's (decompressing what they hold)."""
    if _capture_format(head[:4]) is not None:
        return True
    compressed = _compressed(head)
    if compressed is None:
        return False
    decompressor = {"gzip": lambda: zlib.decompressobj(wbits=31), "bzip2": bz2.BZ2Decompressor,
                    "xz": lzma.LZMADecompressor}[compressed[0]]()
    try:
        return _capture_format(decompressor.decompress(head)[:4]) is not None
    except _DAMAGED_STREAM:
        return False


def fetch_url(url: str, on_copy: OnCopy | None = None) -> CaptureFile | InputProblem:
    """The object a URL names, copied (decompressed if compressed) to a temporary file, as stdin is."""
    found = _filesystem(url)
    if isinstance(found, InputProblem):
        return found
    fs, path = found
    try:
        with fs.open(path, "rb") as stream:
            compressed = _compressed(stream.read(6))
            stream.seek(0)
            if compressed is None:
                return spool(stream, url, "the object", on_copy)
            kind, opener = compressed
            with opener(stream) as inner:
                return spool(inner, url, f"the {kind} object", on_copy)
    except FileNotFoundError:
        return InputProblem(url, "no such file or object")
    except IsADirectoryError:
        return InputProblem(url, "is a directory")
    except Exception as exc:  # the filesystem's own errors (credentials, network): one line for the user
        return InputProblem(url, _one_line(exc))
