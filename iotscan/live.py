"""Live capture: one interface through the same stages and sinks as `analyze`, until it is stopped.

The meter (iotscan.capture.source) does the capturing in its own process; this module adds what a
long-running capture needs around the one-pass pipeline (iotscan.pipeline.Analysis.run_interface):

* checks before starting: the interface exists, the process may capture (one clear line if not);
* limits: --duration and --count stop the capture the same clean way as Ctrl-C and SIGTERM
  (the meter flushes its active flows, they go through the stages, the summary comes last);
* periodic ``stats`` records (records.STATS_FIELDS) between the flow records;
* a Rich view on a terminal (iotscan.output.live_view): rates, drops, the busiest flows active now
  (the meter's snapshots, iotscan.capture.active), the latest attacks, alerts and floods, the devices
  seen.

Per flow, only ``LiveMonitor.run`` runs (a counter, a few dict lookups); everything else happens in
one ticker thread that polls the meter's shared counters a few times a second.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console, Group
from rich.live import Live

from iotscan.capture.source import ACTIVE, DROPPED, IFDROPPED, PACKETS, PRIVILEGE_FIX, FlowSource, MeterConfig
from iotscan.errors import CaptureError, ExitCode
from iotscan.output.console import Reporter, error
from iotscan.output.live_view import DeviceSeen, LiveViewData, render_live_view
from iotscan.output.records import DEVICE_LINK_FIELDS, STATS_FIELD_NAMES, is_local_address, iso_timestamp
from iotscan.output.sinks import Sink
from iotscan.output.table import EVENT_TYPES
from iotscan.pipeline import Analysis
from iotscan.stage import Event, SourceInfo, Stage

ANY_INTERFACE = "any"  # libpcap's pseudo-interface: every interface, Linux cooked headers
_TICK_S = 0.25  # ticker period: precision of --duration, pace of the view
_VIEW_EVERY_S = 0.5
_ACTIVE_EVERY_MS = 1000  # the meter's snapshots of the busiest active flows, for the view
_LATEST_ATTACKS = 8
_LATEST_EVENTS = 8
_MAX_TRACKED = 100_000  # bound on the addresses remembered for "devices seen" (a spoofed flood is endless)


# -- checks before capturing ---------------------------------------------------------------------


def list_interfaces() -> list[str]:
    """Names of the network interfaces of this host (this network namespace)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        try:
            names = os.listdir("/sys/class/net")
        except OSError:
            names = []
    return sorted(set(names))


def interface_state(name: str) -> str:
    """"up", "down", "unknown" (loopback and tunnels often say so), from /sys; "" if not known."""
    try:
        with open(f"/sys/class/net/{name}/operstate") as f:
            return f.read().strip()
    except OSError:
        return ""


def check_interface(name: str) -> None:
    """Raise CaptureError naming the interfaces that exist when ``name`` is not one of them."""
    if name == ANY_INTERFACE:
        return
    names = list_interfaces()
    if name not in names:
        raise CaptureError(f"{name}: no such interface; interfaces here: {', '.join(names) or 'none'}"
                           f" (or '{ANY_INTERFACE}' for all)")


def check_capture_privileges(interface: str) -> None:
    """Raise CaptureError saying what to run when this process may not open a packet socket."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            return  # not a permission problem (no AF_PACKET here?): libpcap explains it when the meter starts
        hint = ""
        if os.geteuid() == 0:
            hint = (" This process is root but lacks CAP_NET_RAW (a container? grant it, e.g. "
                    "docker run --cap-add NET_RAW --cap-add NET_ADMIN).")
        raise CaptureError(f"{interface}: no permission to capture packets.{hint} {PRIVILEGE_FIX}") from None


def preflight(interface: str) -> None:
    """The checks before capturing, each failing with one line that says what to do."""
    check_interface(interface)
    check_capture_privileges(interface)


def probe_capture(interface: str) -> None:
    """Start the real meter on ``interface`` and stop it at once: raises CaptureError when capturing fails."""
    source = FlowSource(MeterConfig(source=interface, live=True, n_dissections=0, bpf="less 1"))
    source.stop()
    for _ in source:
        pass


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveLimits:
    duration_s: float | None = None  # stop after this many seconds
    count: int | None = None  # stop once this many flow records are written
    stats_interval_s: float | None = None  # a stats record every this many seconds


class LiveMonitor(Stage):
    """The last stage: counts flows for --count, remembers the latest attacks, the devices seen (their flows,
    bytes and DHCP host names), and the latest alerts and floods written (``note``)."""

    def __init__(self, count: int | None, on_count: Callable[[], None], on_begin: Callable[[], None],
                 summary_fields: Callable[[], dict[str, Any]], attacks_only: bool = False) -> None:
        super().__init__()
        self.count = count or 0
        self.attacks_only = attacks_only  # --count counts the records written: only attacks then
        self.on_count = on_count
        self.on_begin = on_begin
        self.summary_fields = summary_fields
        self.flows = 0
        self.latest_attacks: deque[dict[str, Any]] = deque(maxlen=_LATEST_ATTACKS)
        self.latest_events: deque[dict[str, Any]] = deque(maxlen=_LATEST_EVENTS)
        self.event_counts: dict[str, int] = {}
        self.devices: dict[str, DeviceSeen] = {}
        self._not_devices: set[str] = set()

    def begin(self, source: SourceInfo) -> None:
        self.on_begin()

    def note(self, record: dict[str, Any]) -> None:
        """A record written that is not a flow: alerts and floods are kept for the view."""
        kind = record.get("event_type")
        if kind in EVENT_TYPES:
            self.latest_events.append(record)
            self.event_counts[kind] = self.event_counts.get(kind, 0) + 1

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        latest_attacks, devices, not_devices = self.latest_attacks, self.devices, self._not_devices
        src_link, dst_link = DEVICE_LINK_FIELDS

        def seen(mac: str, ip: str, record: dict[str, Any]) -> None:
            device = devices.get(mac)
            if device is None:
                if len(devices) >= _MAX_TRACKED:
                    return
                device = devices[mac] = DeviceSeen(mac, ip)
            device.flows += 1
            device.bytes += record["bytes"]
            if record["dhcp_hostname"] and ip == record["src_ip"]:
                device.hostname = record["dhcp_hostname"]

        for record, flow in events:
            if record is None or flow is None:  # a heartbeat, a claimed flow, a record of a stage: noted by the sink
                yield record, flow
                continue
            attack = record.get("verdict") == "attack"
            if attack or not self.attacks_only:
                self.flows += 1
            if attack:
                latest_attacks.append(record)
            # Devices: the device stage's (the local MAC at either end) when it runs, else the MACs of local senders.
            if src_link in record:
                if record[src_link] is not None:
                    seen(record[src_link], record["src_ip"], record)
                if record[dst_link] is not None:
                    seen(record[dst_link], record["dst_ip"], record)
            else:
                mac = record["src_mac"]
                if mac in devices:
                    seen(mac, record["src_ip"], record)
                elif mac not in not_devices:
                    if is_local_address(record["src_ip"]):
                        seen(mac, record["src_ip"], record)
                    elif len(not_devices) < _MAX_TRACKED:
                        not_devices.add(mac)
            if self.flows == self.count:
                self.on_count()
            yield record, flow

    def summarize(self, summary: dict[str, Any]) -> None:
        super().summarize(summary)
        summary.update(self.summary_fields())


class _LockedSink:
    """The sink shared by the flow loop and the stats ticker: one record at a time, whole lines. Records
    that are not flows are shown to ``note`` (the view keeps alerts and floods)."""

    def __init__(self, sink: Sink, note: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.sink = sink
        self.note = note
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.sink.write(record)
        if self.note is not None and record.get("event_type") != "flow":
            self.note(record)

    def close(self, summary: dict[str, Any]) -> None:
        with self.lock:
            self.sink.close(summary)


@dataclass
class _Sample:
    at: float
    packets: int
    flows: int
    dropped: int


class LiveRun:
    """One `iotscan live` run: checks, capture through the stages, limits, stats, view, summary."""

    def __init__(self, sink: Sink, stages: Sequence[Stage], config: MeterConfig, limits: LiveLimits,
                 *, reporter: Reporter | None = None, fail_on: str | None = None,
                 view_console: Console | None = None, attacks_only: bool = False,
                 vendor: Callable[[str], str | None] | None = None) -> None:
        # the view shows the busiest active flows: the meter then sends snapshots of them
        self.config = replace(config, live=True, active_every_ms=_ACTIVE_EVERY_MS if view_console else 0)
        self.interface = config.source
        self.limits = limits
        self.monitor = LiveMonitor(limits.count, lambda: self.stop("count"), self._keep_source,
                                   self._summary_fields, attacks_only=attacks_only)
        self.sink = _LockedSink(sink, self.monitor.note)
        self.vendor = vendor or (lambda mac: None)  # a MAC's vendor, for the view
        self.analysis = Analysis(self.sink, stages=[*stages, self.monitor], reporter=reporter,
                                 fail_on=fail_on, attacks_only=attacks_only)
        self.view_console = view_console
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.source: FlowSource | None = None  # kept after the run for its final counters
        self._done = threading.Event()
        self._last_stats: _Sample | None = None
        self._last_view: _Sample | None = None
        self._view_rates = (0.0, 0.0)

    # -- control -----------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """End the capture cleanly (active flows are flushed): a limit, or the reader went away."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.analysis.stop()

    def run(self) -> ExitCode:
        """Capture until stopped; write the summary last; return the exit code."""
        preflight(self.interface)
        self.started = time.monotonic()
        self._last_stats = self._last_view = _Sample(self.started, 0, 0, 0)
        live = None
        if self.view_console is not None:
            live = Live(self._render(), console=self.view_console, auto_refresh=False, transient=True)
            live.start()
        ticker = threading.Thread(target=self._tick, args=(live,), name="iotscan-live-ticker", daemon=True)
        ticker.start()
        try:
            self.analysis.run_interface(SourceInfo(name=self.interface, config=self.config))
        finally:
            self._done.set()
            ticker.join()
            if live is not None:
                live.stop()
            self._check_end()
            self.analysis.finish()
        return self.analysis.exit_code()

    def _check_end(self) -> None:
        """A live capture ends only when stopped: ending by itself (interface gone) is an error."""
        inputs = self.analysis.state.inputs
        status = inputs[-1]["status"] if inputs else "error"
        if status == "error":
            self.stop_reason = "error"
        elif status != "stopped":
            self.stop_reason = "error"
            inputs[-1]["status"] = "error"
            message = "the capture ended by itself (the interface went down or disappeared)"
            self.analysis.state.error(self.interface, message, ExitCode.CAPTURE)
            error(f"{self.interface}: {message}")
        elif self.stop_reason is None:
            self.stop_reason = "signal"

    def _keep_source(self) -> None:
        """The meter's counters stay readable after the run, for the summary."""
        self.source = self.analysis.current_source

    def _summary_fields(self) -> dict[str, Any]:
        """records.LIVE_SUMMARY_FIELDS."""
        source = self.analysis.current_source or self.source
        return {"dropped_packets": self._counter(DROPPED), "ifdropped_packets": self._counter(IFDROPPED),
                "unread_packets": source.report.unread_packets if source is not None else 0,
                "stop_reason": self.stop_reason}

    def _counter(self, index: int) -> int:
        source = self.analysis.current_source or self.source
        return source.counter(index) if source is not None else 0

    # -- the ticker thread -------------------------------------------------------------------------

    def _tick(self, live: Live | None) -> None:
        deadline = self.started + self.limits.duration_s if self.limits.duration_s else None
        interval = self.limits.stats_interval_s
        next_stats = self.started + interval if interval else None
        next_view = self.started
        while not self._done.wait(_TICK_S):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                deadline = None
                self.stop("duration")
            if next_stats is not None and interval and now >= next_stats:
                next_stats += interval * max(1, int((now - next_stats) // interval) + 1)
                try:
                    self.sink.write(self._stats_record(now))
                except (BrokenPipeError, ValueError):  # the reader went away; the main thread says so
                    self.stop("signal")
                    next_stats = None
            if live is not None and now >= next_view:
                next_view = now + _VIEW_EVERY_S
                live.update(self._render(now), refresh=True)

    def _sample(self, now: float) -> _Sample:
        return _Sample(now, self._counter(PACKETS), self.analysis.state.flows, self._counter(DROPPED))

    def _stats_record(self, now: float) -> dict[str, Any]:
        sample, last = self._sample(now), self._last_stats
        assert last is not None
        self._last_stats = sample
        span = max(now - last.at, 1e-6)
        made_ms = int(time.time() * 1000)
        values = (
            iso_timestamp(made_ms), "stats", self.interface, made_ms, round(now - self.started, 3), round(span, 3),
            sample.packets, sample.flows, self._counter(ACTIVE), self.analysis.state.attacks, sample.dropped,
            self._counter(IFDROPPED), round((sample.packets - last.packets) / span, 1),
            round((sample.flows - last.flows) / span, 1), round((sample.dropped - last.dropped) / span, 1),
        )
        return dict(zip(STATS_FIELD_NAMES, values, strict=True))

    # -- the view ----------------------------------------------------------------------------------

    def active(self) -> Any:
        """The meter's latest snapshot of the busiest active flows (None before the first)."""
        source = self.analysis.current_source or self.source
        return source.active if source is not None else None

    def view_data(self, now: float | None = None) -> LiveViewData:
        now = now or time.monotonic()
        sample, last = self._sample(now), self._last_view
        if last is not None and now - last.at >= 0.9:  # rates over about a second
            span = now - last.at
            self._view_rates = ((sample.packets - last.packets) / span, (sample.flows - last.flows) / span)
            self._last_view = sample
        limits = []
        if self.limits.duration_s:
            limits.append(f"stops after {self.limits.duration_s:g} s")
        if self.limits.count:
            limits.append(f"after {self.limits.count:,} {'attacks' if self.monitor.attacks_only else 'flows'}")
        state = self.analysis.state
        active = self.active()
        devices = dict(self.monitor.devices)
        for flow in active.flows if active is not None else ():  # devices talking now, whose flows go on
            for ip, mac in ((flow.src_ip, flow.src_mac), (flow.dst_ip, flow.dst_mac)):
                if mac not in devices and is_local_address(ip):
                    devices[mac] = DeviceSeen(mac, ip)
        return LiveViewData(
            interface=self.interface, elapsed_s=now - self.started, limits="; ".join(limits) or "Ctrl-C stops",
            packets_per_s=self._view_rates[0], flows_per_s=self._view_rates[1], active_flows=self._counter(ACTIVE),
            packets=sample.packets, flows=state.flows, attacks=state.attacks,
            drops=sample.dropped + self._counter(IFDROPPED),
            families=dict(state.attack_families),  # one C-level copy: the flow loop adds to it meanwhile
            active=active, latest_attacks=list(self.monitor.latest_attacks),
            events=list(self.monitor.latest_events), event_counts=dict(self.monitor.event_counts),
            devices=devices, vendor=self.vendor)

    def _render(self, now: float | None = None) -> Group:
        width = self.view_console.width if self.view_console is not None else 120
        return render_live_view(self.view_data(now), width)
