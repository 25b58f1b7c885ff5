"""Side passes: a second, BPF-filtered meter beside the main one, over the same file or a second capture
of the same interface, for the payloads the main pass does not read (an NFStream plugin there would run
for every packet: +57% time). The request pass (iotscan.detect.request_pass) and the identity pass
(iotscan.devices.identity) are side passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nfstream.flow import NFlow
from nfstream.plugin import NFPlugin

from iotscan.capture.source import FlowSource, MeterConfig, SourceReport
from iotscan.errors import InputError, IotscanError

SIDE_PASS_STOP_S = 5.0  # how long a stopped live capture waits for its side passes' last flows
# A side pass's capture gets this share of the main capture's ring buffer (MeterConfig.buffer_mib): its filter lets
# few packets through, and it loses findings, not flows, when it falls behind
SIDE_PASS_BUFFER_SHARE = 4


class SidePass(threading.Thread):
    """A second, BPF-filtered pass beside the main one (over the same file, or a second capture of
    the same interface), for payloads the main pass does not read (a plugin there would run for every
    packet). Its own meter process does the work; this thread only gathers, with ``collect``, what the
    meter keeps of the few flows the filter lets through (see MeterConfig.reduce).

    ``configs`` are tried in turn while one is rejected as input: the first is usually a VLAN-aware
    filter, which link types without Ethernet framing refuse. Start it once the main meter runs (so
    the forks do not race); ``stop()`` ends it early from another thread.
    """

    def __init__(self, name: str, configs: Sequence[MeterConfig], collect: Callable[[Iterator[Any]], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.configs = list(configs)
        self.collect = collect
        self.result: Any = None
        self.error: IotscanError | None = None
        self.report = SourceReport()
        self._source: FlowSource | None = None
        self._stopped = False

    def run(self) -> None:
        for i, config in enumerate(self.configs):
            self._source = FlowSource(config)
            if self._stopped:
                self._source.stop()
            try:
                self.result = self.collect(iter(self._source))
                self.report = self._source.report
                return
            except InputError as exc:
                if i == len(self.configs) - 1:
                    self.error = exc
            except IotscanError as exc:
                self.error = exc
                return

    def stop(self) -> None:
        self._stopped = True
        if self._source is not None:
            self._source.stop()

    def end(self) -> bool:
        """Wait for the pass to end; whether it did. Over a file it ends by itself. A second capture of
        an interface never would: it is stopped, and waited for at most SIDE_PASS_STOP_S while it
        flushes the flows it still holds."""
        if self.configs[0].live:
            self.stop()
            self.join(SIDE_PASS_STOP_S)
        else:
            self.join()
        return not self.is_alive()

    def dropped(self) -> str | None:
        """On an interface, whose second capture may fall behind too (a flood of packets its filter lets through):
        how many packets the kernel dropped from it, as a warning's text; None when none."""
        n = self.report.dropped_packets
        return f"the kernel dropped {n:,} packets of the {self.name} capture: what they held was not read" if n \
            else None

    def outcome(self) -> Any:
        """Run here (no thread) and return what ``collect`` made, or raise the pass's error."""
        self.run()
        if self.error is not None:
            raise self.error
        return self.result


def side_pass(name: str, path: str, config: MeterConfig, bpf: str, plugin: NFPlugin,
              collect: Callable[[Iterator[Any]], Any], snaplen: int,
              reduce: Callable[[NFlow], Any] | None = None,
              packet_reader: Callable[[Any, Any], Any] | None = None) -> SidePass:
    """A side pass over one capture file, or a second capture on a live interface (Linux hands each
    packet socket its own copy): the packets ``bpf`` lets through, read by ``plugin``; ``collect``
    gets what ``reduce`` keeps of each flow (the flows themselves without it), and what ``packet_reader``
    makes of the packets it reads whole (MeterConfig.packet_reader).

    It keeps the main pass's timeouts and narrows its --bpf (``config``); nDPI and flow statistics
    are off, as the pass only reads payloads. The filter's forms (bpf_forms) are tried in turn.
    """
    def meter(own: str) -> MeterConfig:
        return MeterConfig(source=path, live=config.live, promisc=config.promisc,
                           buffer_mib=max(config.buffer_mib // SIDE_PASS_BUFFER_SHARE, 2) if config.buffer_mib else 0,
                           bpf=f"({config.bpf}) and ({own})" if config.bpf else own,
                           idle_timeout=config.idle_timeout, active_timeout=config.active_timeout,
                           max_flows=config.max_flows or 65536, statistics=False, n_dissections=0,
                           snaplen=max(config.snaplen, snaplen), decode_tunnels=config.decode_tunnels,
                           plugins=(plugin,), reduce=reduce, packet_reader=packet_reader)

    return SidePass(name, [meter(form) for form in bpf_forms(bpf)], collect)


def bpf_forms(bpf: str) -> tuple[str, str]:
    """A filter's forms to try in turn: VLAN-aware ("vlan" shifts the offsets of the expressions after it, so
    the tagged form catches tagged frames), then as it is, for link types without Ethernet framing (Linux
    cooked, raw IP), which reject "vlan"."""
    return f"({bpf}) or (vlan and {bpf})", bpf
