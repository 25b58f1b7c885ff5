"""The source stage: NFStream flows from one capture file or one interface, streamed as they expire.

NFStream's own ``NFStreamer`` hangs when its meter process dies, keeps reading a capture in a
loop-forever state on read errors it does not report, orders its idle scan by flow creation (so
one long flow delays the expiry of every later one), never expires flows on a quiet interface and
drops the flows still active when it is interrupted. So iotscan runs its own meter loop, built
from NFStream's engine, ``NFlow`` and flow-key parts, in one child process:

* flows are sent in small batches over a bounded queue (back-pressure bounds memory), each
  reduced first (``MeterConfig.reduce``) to what the reader needs: the main pass sends the values
  a record is made of (records.MeteredFlow), side passes their few findings;
* the flow table is kept in last-activity order, so the idle scan is exact;
* ``max_flows`` caps the table: the least recently active flow is expired early;
* under a flood, a packet opening a flow to a service the reader claimed is held instead of made an NFStream
  flow (``FlowSource.hold``; iotscan.capture.hold);
* a read error in a file ends the file with a ``truncated`` report instead of hiding it;
* on a live interface, the meter reads without blocking and waits on the capture's descriptor
  with a time-out, so the clock advances and idle flows expire on a quiet link (libpcap's
  TPACKET_V3 read never times out when no packet arrives at all);
* ``stop()`` makes the meter flush every active flow and report, for Ctrl-C and SIGTERM;
* for a live view, it can send a bounded snapshot of the busiest active flows now and then
  (iotscan.capture.active), kept by the reader as ``FlowSource.active``;
* any exception in the meter (a plugin's too) comes back as an error, and a dead meter
  is detected by the reader instead of blocking it forever.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import os
import queue
import select
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nfstream.engine import create_engine, setup_capture, setup_dissector
from nfstream.engine.engine import setup_filter
from nfstream.flow import NFlow
from nfstream.meter import get_flow_key_from_pkt
from nfstream.plugin import NFPlugin
from nfstream.utils import NFMode

from iotscan.capture.active import ActiveSnapshot, take_snapshot
from iotscan.capture.flows import BlockFlow, FactsBlockFlow, PayloadFlow
from iotscan.capture.hold import HeldPacket, HeldServices
from iotscan.errors import CaptureError, ExitCode, InputError

_BATCH_FLOWS = 128  # flows per queue message: amortises locking and pickling
_BATCH_MAX_AGE_S = 0.2  # a live batch waits at most this long
_QUEUE_BATCHES = 64  # at most 64 * 128 expired flows in flight: the back-pressure bound
_COUNTER_EVERY = 1024  # packets between updates of the shared counters
_SCAN_INTERVAL_MS = 10  # idle scan period in capture time, as in NFStream
_SCAN_BUDGET = 1000  # flows expired per idle scan at most, as in NFStream
_POLL_S = 0.25  # how often the reader checks that the meter is alive
_LIVE_BLOCK_MS = 250  # libpcap delivers live packets in blocks retired after at most this long
_LIVE_WAIT_MS = 100  # longest wait for packets before the clock moves on and stop() is checked
# On an interface, once stopped: what the kernel's buffer still holds from before the stop is metered for at most
# this long, then counted (unmetered) for at most as long again (SourceReport.unread_packets)
_DRAIN_S = 2.0


# Flows tracked at once unless told otherwise. A flow costs about 4 KB in the meter, so this bounds the
# table near 400 MB when every packet opens a flow (a flood of spoofed sources).
DEFAULT_MAX_FLOWS = 100_000
# Emergency, in the manner of Suricata's: at most this share of max_flows are embryonic flows, of at most
# EMBRYO_PACKETS packets (a flood's: a SYN, a probe, and perhaps its answer); beyond, the least recently active
# of them is expired early, so that a flood keeps the table (and memory) at a quarter of the cap while the
# established flows keep their place.
EMBRYO_SHARE = 4
EMBRYO_PACKETS = 2

# Indices into the shared counter array.
PACKETS, IGNORED, ACTIVE, EVICTED, DROPPED, IFDROPPED = range(6)
_N_COUNTERS = 6


@dataclass(frozen=True)
class MeterConfig:
    """Everything the meter needs; the CLI options map onto it one to one."""

    source: str
    live: bool = False
    bpf: str | None = None
    idle_timeout: int = 120  # seconds
    active_timeout: int = 1800  # seconds
    max_flows: int = DEFAULT_MAX_FLOWS  # 0: no cap on the flow table
    statistics: bool = True
    splt: int = 0  # early packets whose sizes, directions and gaps are kept
    n_dissections: int = 20
    snaplen: int = 1536
    promisc: bool = True
    # On an interface, the kernel's ring buffer for the capture, in MiB (0: libpcap's default, 2 MiB). What
    # arrives while the meter is busy waits there: a burst larger than the ring is dropped by the kernel.
    buffer_mib: int = 0
    decode_tunnels: bool = True
    accounting_mode: int = 0
    plugins: tuple[NFPlugin, ...] = ()
    # What of each flow leaves the meter (None: nothing; without reduce, the NFlow itself). Unpickling
    # NFStream's 94-slot flows cost the reader more than anything it then did with them: the main pass
    # sends a MeteredFlow (records.metered_flow, or features.metered_flow_with_statistics with the flow's
    # block of C numbers: without plugins, flows are capture.flows.BlockFlows), a side pass a few fields of a few of
    # its flows (with plugins, PayloadFlows). report.flows counts all.
    reduce: Callable[[NFlow], Any] | None = None
    # For a live view: every this many ms of capture time, a snapshot of the busiest active flows (0: none).
    # Taken with the idle scan, never per packet; main pass only (its flows keep what a snapshot reads).
    active_every_ms: int = 0
    # A named tuple type that the reader makes reduce's plain tuples into. A named tuple is pickled and
    # unpickled through Python code per item (its __getnewargs__ and __new__), a plain tuple in C: on a flood
    # of one-packet flows the meter spent a fifth of its time pickling MeteredFlows.
    item_type: type[tuple] | None = None
    # A side pass's reader of a packet that opens a flow (none of the table's): what it returns of it (not None)
    # is sent as reduce's items are, and the packet opens no flow. For packets whose flow would hold nothing more
    # than they say: a scanner's SYN, read whole by its header (the request pass's: a flood of them made it the
    # slowest pass, and the first scored flows wait for it).
    packet_reader: Callable[[Any, Any], Any] | None = None
    # Read what nDPI found that NFStream does not hand over (NdpiFacts: its risks, some header texts) from its
    # flow structure as each flow expires; a pass without plugins whose flows are reduced only (the main pass).
    # Of nDPI's risks, those of ndpi_risk_mask are kept (a flow with others only has nothing of note to send).
    ndpi_facts: bool = False
    ndpi_risk_mask: int = (1 << 64) - 1
    # What leaves the meter of a held packet alone (iotscan.capture.hold: a flooded service's new flow that the
    # reader claimed with FlowSource.hold), and what the reader makes of a batch of them, one item for the batch;
    # None: the meter holds nothing (the main pass holds when its flows are scored and a flood's folded).
    held_reduce: Callable[[HeldPacket], Any] | None = None
    held_type: Callable[[list[Any]], Any] = list


@dataclass
class SourceReport:
    """What the meter tells at the end of a source."""

    packets: int = 0
    ignored_packets: int = 0
    flows: int = 0
    evicted_flows: int = 0
    emergency_flows: int = 0  # embryonic flows expired early (see EMBRYO_SHARE)
    dropped_packets: int = 0
    # on an interface: packets of before the stop still in the kernel's buffer when the meter gave up draining it
    # (at least this many: counting stops after _DRAIN_S too)
    unread_packets: int = 0
    read_error: bool = False
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)


class _Batcher:
    """Collects expired flows into batches for the queue."""

    def __init__(self, channel: Any, reduce: Callable[[NFlow], Any] | None) -> None:
        self.channel = channel
        self.reduce = reduce
        self.batch: list[Any] = []
        self.since = time.monotonic()
        self.flows = 0
        self.held = False  # the batch holds held packets' flows (sent apart, as ("held", batch), in order)

    def put(self, flow: NFlow) -> None:
        self.flows += 1
        item: Any = flow
        if self.reduce is not None:
            item = self.reduce(flow)
            if item is None:
                return
        if self.held:
            self.flush()
        if not self.batch:
            self.since = time.monotonic()
        self.batch.append(item)
        if len(self.batch) >= _BATCH_FLOWS:
            self.flush()

    def put_read(self, item: Any) -> None:
        """What MeterConfig.packet_reader made of a packet that opened no flow (counted as one)."""
        self.flows += 1
        if not self.batch:
            self.since = time.monotonic()
        self.batch.append(item)
        if len(self.batch) >= _BATCH_FLOWS:
            self.flush()

    def put_held(self, item: Any) -> None:
        """What MeterConfig.held_reduce made of a held packet alone (a one-packet flow)."""
        if not self.held:
            self.flush()
            self.held = True
        self.put_read(item)

    def flush(self) -> None:
        if self.batch:
            self.channel.put(("held", self.batch) if self.held else self.batch)
            self.batch = []
        self.held = False

    def flush_if_old(self) -> None:
        if self.batch and time.monotonic() - self.since >= _BATCH_MAX_AGE_S:
            self.flush()


def _die_with_parent(parent: int) -> None:
    """Linux: the meter is killed with iotscan (SIGKILL, OOM killer) instead of capturing on, alone."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; follows the forking thread
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _meter_main(cfg: MeterConfig, channel: Any, counters: Any, stop: Any, holds: Any, parent: int) -> None:
    """Child process: read packets, meter flows, send batches; never raise, always end with a report."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        report = _meter_loop(cfg, channel, counters, stop, holds)
        channel.put(("end", report))
    except _SetupError as exc:
        channel.put(("error", str(exc)))
    except BaseException as exc:  # a plugin bug must become an error message, not a hang
        channel.put(("error", f"flow meter failed: {type(exc).__name__}: {exc}"))


class _SetupError(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _libpcap() -> ctypes.CDLL:
    """The libpcap linked into NFStream's engine, for the calls its cffi interface does not expose.

    Opening the same shared object again returns the instance already loaded, so a ``pcap_t``
    made by the engine can be passed to these functions.
    """
    import _lib_engine  # NFStream's compiled engine (nfstream.engine imports it too)

    pcap = ctypes.CDLL(_lib_engine.__file__)
    for name, args, restype in (
        ("pcap_set_timeout", [ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
        ("pcap_activate", [ctypes.c_void_p], ctypes.c_int),
        ("pcap_geterr", [ctypes.c_void_p], ctypes.c_void_p),  # the address of the handle's error buffer
        ("pcap_close", [ctypes.c_void_p], None),
        ("pcap_setnonblock", [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
        ("pcap_get_selectable_fd", [ctypes.c_void_p], ctypes.c_int),
    ):
        function = getattr(pcap, name)
        function.argtypes, function.restype = args, restype
    return pcap


def _open_live(ffi: Any, capture: Any) -> tuple[int, ctypes.c_char]:
    """Activate an interface capture in non-blocking mode.

    Returns the descriptor to wait on, and the first byte of libpcap's error buffer: a read error
    (the interface went down or away) looks like "no packet" through ``capture_next``, and libpcap
    has consumed the socket's error by then, so its message is the only trace left.
    """
    pcap = _libpcap()
    handle = ctypes.c_void_p(int(ffi.cast("uintptr_t", capture)))
    errbuf = pcap.pcap_geterr(handle)
    pcap.pcap_set_timeout(handle, _LIVE_BLOCK_MS)
    status = pcap.pcap_activate(handle)  # > 0 is a warning (e.g. no promiscuous mode): capture works
    if status < 0:
        detail = ctypes.string_at(errbuf).decode("utf-8", errors="replace")
        pcap.pcap_close(handle)
        reason = _ACTIVATE_ERRORS.get(status, "cannot start capturing")
        raise _SetupError(f"{reason}: {detail}" if detail and detail not in reason else reason)
    nonblock_error = ctypes.create_string_buffer(256)
    if pcap.pcap_setnonblock(handle, 1, nonblock_error) < 0:
        pcap.pcap_close(handle)
        raise _SetupError(f"cannot read without blocking: {nonblock_error.value.decode(errors='replace')}")
    ctypes.memset(errbuf, 0, 1)  # forget activation warnings: from now on, text there is a read error
    return pcap.pcap_get_selectable_fd(handle), ctypes.c_char.from_address(errbuf)


# pcap_activate() error codes (pcap/pcap.h).
_ACTIVATE_ERRORS = {
    -5: "no such interface",
    -8: "permission denied",
    -11: "permission denied (promiscuous mode)",
    -9: "interface is down",
    -7: "monitor mode not supported",
}


def _meter_loop(cfg: MeterConfig, channel: Any, counters: Any, stop: Any, holds: Any = None) -> SourceReport:
    ffi, lib = create_engine()
    if lib is None:
        raise _SetupError("NFStream's engine library failed to load")
    mode = NFMode.INTERFACE if cfg.live else NFMode.SINGLE_FILE
    error = ffi.new("char[256]")
    buffer_bytes = cfg.buffer_mib << 20 if cfg.live else 0
    capture = setup_capture(ffi, lib, cfg.source, cfg.snaplen, cfg.promisc, mode, error, os.getpid(), buffer_bytes)
    if capture is None:
        raise _SetupError(ffi.string(error).decode("utf-8", errors="replace") or "cannot open capture")
    waiter = read_error = None
    if cfg.live:
        waiter = select.poll()
        fd, read_error = _open_live(ffi, capture)
        waiter.register(fd, select.POLLIN)
    if not setup_filter(capture, lib, error, cfg.bpf):
        raise _SetupError(ffi.string(error).decode("utf-8", errors="replace") or "cannot set the BPF filter")
    dissector = setup_dissector(ffi, lib, cfg.n_dissections)
    if dissector == ffi.NULL and cfg.n_dissections:
        raise _SetupError("nDPI failed to initialise")

    udps = cfg.plugins
    sync = bool(udps)
    idle_ms, active_ms = cfg.idle_timeout * 1000, cfg.active_timeout * 1000
    stats, splt, n_dis, acc, tunnels = cfg.statistics, cfg.splt, cfg.n_dissections, cfg.accounting_mode, \
        cfg.decode_tunnels
    out = _Batcher(channel, cfg.reduce)
    flow_class = NFlow if cfg.reduce is None else PayloadFlow if udps else \
        FactsBlockFlow.keeping(cfg.ndpi_risk_mask) if cfg.ndpi_facts and n_dis else BlockFlow
    cache: OrderedDict[tuple, NFlow] = OrderedDict()  # oldest activity first
    # The embryonic flows of the cache, oldest activity first: an index beside it (the cache keeps every flow in
    # its order), whose oldest goes when there are more than embryo_cap
    embryos: OrderedDict[tuple, NFlow] = OrderedDict()
    embryo_cap = cfg.max_flows // EMBRYO_SHARE if cfg.max_flows else 0
    # held packets (iotscan.capture.hold), oldest first: embryonic flows too, as many as the cap allows
    held: OrderedDict[tuple, HeldPacket] = OrderedDict()
    held_reduce = cfg.held_reduce
    services = HeldServices() if held_reduce is not None and holds is not None else None
    reader = cfg.packet_reader
    report = SourceReport()
    interface_stats = ffi.new("struct nf_stat *")

    def expire(flow: NFlow) -> None:
        out.put(flow.expire(udps, sync, n_dis, stats, splt, ffi, lib, dissector))

    def expire_held(first: HeldPacket) -> None:
        assert held_reduce is not None
        out.put_held(held_reduce(first))

    def held_first(table: OrderedDict[tuple, NFlow]) -> bool:
        """Whether the least recently active of the held packets and the flows of ``table`` (oldest first) is a held
        packet (flows of both go in the order they would have without holding)."""
        return bool(held) and (not table or next(iter(held.values())).bidirectional_last_seen_ms
                               <= next(iter(table.values()))._C.bidirectional_last_seen_ms)

    def expire_oldest_embryo() -> None:
        """The emergency: the least recently active embryonic flow, held or not, is expired early."""
        report.emergency_flows += 1
        if held_first(embryos):
            expire_held(held.popitem(last=False)[1])
        else:
            oldest = next(iter(embryos))
            del embryos[oldest]
            expire(cache.pop(oldest))

    def take_holds() -> None:
        """The services the reader claimed or released since the last look."""
        if services is not None:
            while not holds.empty():
                services.update(holds.get())

    def new_flow(packet: Any, key: tuple) -> None:
        try:
            flow = flow_class(packet, ffi, lib, udps, sync, acc, n_dis, stats, splt, dissector, tunnels, 0)
        except OSError:  # out of memory for this flow: skip it, as NFStream does
            return
        if flow.expiration_id == -1:  # a plugin expired it on its first packet
            expire(flow)
        else:
            cache[key] = flow
            if embryo_cap:
                embryos[key] = flow

    snapshot_every = cfg.active_every_ms if issubclass(flow_class, BlockFlow) else 0
    snapshot_at = 0  # capture time of the last snapshot (0: none yet)

    def scan(tick: int) -> None:
        """Every _SCAN_INTERVAL_MS of capture time: expire idle flows; now and then, a snapshot for a live view."""
        nonlocal snapshot_at
        scan_idle(tick)
        if snapshot_every and tick - snapshot_at >= snapshot_every:
            if snapshot_at:
                channel.put(("active", take_snapshot(cache, snapshot_at, tick, ffi)))
            snapshot_at = tick

    def scan_idle(tick: int) -> None:
        for _ in range(_SCAN_BUDGET):  # the least recently active first, held packets and flows alike
            if held_first(cache):
                if not next(iter(held.values())).is_idle(tick, idle_ms):
                    return
                expire_held(held.popitem(last=False)[1])
                continue
            if not cache:
                return
            key = next(iter(cache))
            flow = cache[key]
            if not flow.is_idle(tick, idle_ms):
                return
            del cache[key]
            embryos.pop(key, None)
            expire(flow)

    def publish() -> None:
        counters[PACKETS] = report.packets
        counters[IGNORED] = report.ignored_packets
        counters[ACTIVE] = len(cache) + len(held)
        counters[EVICTED] = report.evicted_flows
        if cfg.live:
            lib.capture_stats(capture, interface_stats, int(mode))
            counters[DROPPED] = report.dropped_packets = interface_stats.dropped
            counters[IFDROPPED] = interface_stats.dropped_by_interface

    stop_ms = 0  # on an interface, once stopped: the stop's time (packets after it are not read)
    drain_until = 0.0

    def stopping() -> bool:
        """Whether the loop ends now for a stop: over a file at once; on an interface once the packets the kernel
        held at the stop are read (the loop sees one after it, or none), or after _DRAIN_S, the rest counted."""
        nonlocal stop_ms, drain_until
        if not stop.is_set():
            return False
        report.stopped = True
        if not cfg.live:
            return True
        if not stop_ms:
            stop_ms, drain_until = int(time.time() * 1000), time.monotonic() + _DRAIN_S
            return False
        if time.monotonic() < drain_until:
            return False
        report.unread_packets = count_unread()
        return True

    def count_unread() -> int:
        unread, until = 0, time.monotonic() + _DRAIN_S
        packet = ffi.new("struct nf_packet *")
        while (ret := lib.capture_next(capture, packet, int(tunnels), 1, 0, int(mode))) >= 0 \
                and packet.time <= stop_ms:
            unread += ret > 0
            if unread % _COUNTER_EVERY == 0 and time.monotonic() > until:
                break
        return unread

    tick = scan_tick = 0
    last_publish = time.monotonic()
    try:
        while True:
            packet = ffi.new("struct nf_packet *")
            ret = lib.capture_next(capture, packet, int(tunnels), 1, 0, int(mode))
            if ret > 0:
                if stop_ms and packet.time > stop_ms:
                    break  # everything of before the stop is read
                if packet.time > tick:
                    tick = packet.time
                else:
                    packet.time = tick  # keep time monotonic, as NFStream does
                if ret == 1:
                    report.packets += 1
                    key = get_flow_key_from_pkt(packet)
                    flow = cache.get(key)
                    if flow is None and held and key in held:  # a held packet's flow goes on: a flow of both
                        opening = held.pop(key)
                        new_flow(opening.packet_copy(ffi), key)
                        flow = cache.get(key)
                    read = None if reader is None or flow is not None else reader(packet, ffi)
                    if read is not None:
                        out.put_read(read)
                    elif flow is None and services is not None and services.services and \
                            (first := services.hold(packet, ffi, acc)) is not None:
                        held[key] = first
                        if embryo_cap and len(held) + len(embryos) > embryo_cap:
                            expire_oldest_embryo()
                    elif flow is None:
                        new_flow(packet, key)
                        if embryo_cap and len(embryos) + len(held) > embryo_cap:
                            expire_oldest_embryo()
                        elif cfg.max_flows and len(cache) > cfg.max_flows:
                            report.evicted_flows += 1
                            oldest = next(iter(cache))
                            embryos.pop(oldest, None)
                            expire(cache.pop(oldest))
                    else:
                        done = flow.update(packet, idle_ms, active_ms, ffi, lib, udps, sync, acc, n_dis,
                                           stats, splt, dissector)
                        if done is None:
                            cache.move_to_end(key)
                            if key in embryos:
                                if flow._C.bidirectional_packets > EMBRYO_PACKETS:
                                    del embryos[key]
                                else:
                                    embryos.move_to_end(key)
                        else:
                            del cache[key]
                            embryos.pop(key, None)
                            out.put(done)
                            if done.expiration_id >= 0:  # idle/active cut: this packet opens a new flow
                                new_flow(packet, key)
                    if report.packets % _COUNTER_EVERY == 0:
                        publish()
                        take_holds()
                        if stopping():
                            break
                if tick - scan_tick >= _SCAN_INTERVAL_MS:
                    scan_tick = tick
                    scan(tick)
            elif ret == 0:
                report.ignored_packets += 1
            elif ret == -1:
                if not cfg.live:
                    report.read_error = True  # libpcap read error: the file is truncated or damaged
                    break
                # Nothing to read: the link is quiet. Wait a little for the next block of packets,
                # then let the clock move on so idle flows expire. It trails the wall clock by one
                # block time-out, since packets still in an unfinished block may be that old.
                assert waiter is not None and read_error is not None
                if stop_ms and time.time() * 1000 > stop_ms + _LIVE_BLOCK_MS:
                    break  # nothing left, and the block open at the stop is retired: everything of before it is read
                if read_error.value != b"\0":
                    message = ctypes.string_at(ctypes.addressof(read_error)).decode(errors="replace")
                    report.warnings.append(f"capture ended: {message}")
                    break
                ready = waiter.poll(_LIVE_WAIT_MS)
                if ready and ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    report.warnings.append("capture ended: the interface went down or disappeared")
                    break
                now = int(time.time() * 1000) - _LIVE_BLOCK_MS
                if now > tick:
                    tick = now
                if tick - scan_tick >= _SCAN_INTERVAL_MS:
                    scan_tick = tick
                    scan(tick)
            else:
                break  # end of file (or the capture was broken off)
            if cfg.live:
                out.flush_if_old()
                if time.monotonic() - last_publish >= 0.5:
                    last_publish = time.monotonic()
                    publish()
                    take_holds()
                    if stopping():
                        break
        publish()
        while cache or held:  # flush what is still active, least recently active first: nothing is lost at the end
            if held_first(cache):
                expire_held(held.popitem(last=False)[1])
            else:
                expire(cache.popitem(last=False)[1])
        out.flush()
    finally:
        lib.capture_close(capture)
        if dissector != ffi.NULL:
            lib.dissector_cleanup(dissector)
    report.flows = out.flows
    counters[ACTIVE] = 0
    return report


class FlowSource:
    """Iterate over the flows of one capture file or interface, each as soon as the meter expires it
    (as the config's ``reduce`` made it: an NFlow without one), and the flows the meter held a batch at a time
    (as the config's ``held_type`` made them).

    After iteration, ``report`` holds the meter's counts. ``stop()`` (from another thread or a
    signal handler) asks the meter to flush its active flows and finish; iteration then ends
    normally with ``report.stopped`` set. With ``heartbeat``, a None comes out whenever no flow
    has for a moment, so that stages buffering flows (scoring batches) can flush on a quiet link.
    """

    def __init__(self, config: MeterConfig, heartbeat: bool = False) -> None:
        self.config = config
        self.heartbeat = heartbeat
        self._ctx = mp.get_context("fork")
        self._counters = self._ctx.Array("q", _N_COUNTERS, lock=False)
        self._stop = self._ctx.Event()
        self.report = SourceReport()
        self.active: ActiveSnapshot | None = None  # the meter's latest snapshot of active flows (active_every_ms)
        self.snapshots = 0  # snapshots received
        self.pid: int | None = None
        self._meter: tuple[Any, Any] | None = None  # (process, queue) while it runs
        self._typed = None if config.item_type is None else functools.partial(tuple.__new__, config.item_type)
        # claims and releases for the meter (iotscan.capture.hold); a queue's put never blocks the reader
        self._holds = self._ctx.Queue() if config.held_reduce is not None else None

    def counter(self, index: int) -> int:
        return int(self._counters[index])

    def stop(self) -> None:
        self._stop.set()

    def hold(self, dst_ip: str, dst_port: int, protocol: int, flood_flows: float, decay_per_s: float) -> None:
        """Let the meter hold the new flows of this service while it receives them at a flood's rate: more than
        ``flood_flows``, counted with this decay (see iotscan.capture.hold). Nothing when the meter cannot (or has
        ended)."""
        if self._holds is not None:
            self._holds.put(("hold", dst_ip, dst_port, protocol, flood_flows, decay_per_s))

    def release(self, dst_ip: str, dst_port: int, protocol: int) -> None:
        """The meter holds no more of this service's new flows."""
        if self._holds is not None:
            self._holds.put(("release", dst_ip, dst_port, protocol))

    def __iter__(self) -> Iterator[Any]:
        channel = self._ctx.Queue(maxsize=_QUEUE_BATCHES)
        proc = self._ctx.Process(target=_meter_main,
                                 args=(self.config, channel, self._counters, self._stop, self._holds,
                                       os.getpid()),
                                 daemon=True, name="iotscan-meter")
        proc.start()
        self.pid = proc.pid
        self._meter = (proc, channel)
        try:
            while True:
                try:
                    item = channel.get(timeout=_POLL_S)
                except queue.Empty:
                    if proc.is_alive():
                        if self.heartbeat:
                            yield None
                        continue
                    try:  # it may have sent its last words just before dying
                        item = channel.get(timeout=1.0)
                    except queue.Empty:
                        raise CaptureError(
                            f"{self.config.source}: the flow meter process died (exit code {proc.exitcode})"
                            " before finishing") from None
                if type(item) is list:
                    yield from item if self._typed is None else map(self._typed, item)
                    continue
                kind, payload = item
                if kind == "held":  # one item for the batch
                    yield self.config.held_type(payload)
                    continue
                if kind == "active":
                    self.active = payload
                    self.snapshots += 1
                    continue
                if kind == "error":
                    raise _classify_error(self.config, payload)
                self.report = payload
                self.active = None  # the capture ended: nothing is active
                return
        finally:
            self._end_meter(grace_s=2.0)

    def close(self) -> None:
        """End the meter now if it still runs: when a stage fails, the iteration is abandoned without being
        closed, and the meter would block on its full queue while the exit waits for it."""
        self._end_meter(grace_s=0.0)

    def _end_meter(self, grace_s: float) -> None:
        """Ask a running meter to stop and wait ``grace_s`` for it (it flushes its flows), then kill it."""
        if self._holds is not None:  # nothing reads it any more
            self._holds.cancel_join_thread()
            self._holds.close()
            self._holds = None
        if self._meter is None:
            return
        proc, channel = self._meter
        self._meter = None
        if proc.is_alive() and grace_s:
            self._stop.set()
            proc.join(timeout=grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
        channel.cancel_join_thread()
        channel.close()


def _real_interpreter() -> str:
    """The interpreter binary itself: setcap refuses symlinks, and a venv's python is one."""
    try:
        return os.readlink("/proc/self/exe")
    except OSError:
        return os.path.realpath(sys.executable)


# What to run when capturing is not permitted.
PRIVILEGE_FIX = ("Run iotscan as root (sudo), or grant the Python interpreter capture rights: "
                 f"sudo setcap cap_net_raw,cap_net_admin=eip {_real_interpreter()}")


def _classify_error(cfg: MeterConfig, message: str) -> Exception:
    """Turn libpcap's and the meter's messages into one-line errors with the documented exit codes."""
    lowered = message.lower()
    if "bpf" in lowered or "filter" in lowered:
        return InputError(f"invalid BPF filter {cfg.bpf!r}: {message}")
    if cfg.live:
        if "permission" in lowered or "not permitted" in lowered:
            return CaptureError(f"{cfg.source}: no permission to capture ({message}). {PRIVILEGE_FIX}")
        return CaptureError(f"{cfg.source}: cannot capture: {message}")
    if "truncated" in lowered or "unknown file format" in lowered or "bad dump file" in lowered:
        return InputError(f"{cfg.source}: unreadable capture: {message}")
    return CaptureError(f"{cfg.source}: {message}", ExitCode.CAPTURE)
