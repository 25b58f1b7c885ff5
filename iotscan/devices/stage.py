"""The device stage: every local device's flows aggregated per MAC, fingerprinted once at the end.

Per flow the stage does a few dict updates (what makes a MAC a device, its counters, the link
fields ``src_device``/``dst_device`` on the flow record). The BPF-filtered identity pass
(DHCP/mDNS/SSDP payloads, iotscan/devices/identity.py) runs beside the main pass in its own meter
process -- over the same file, or as a second capture of the same interface -- started once the
main meter runs and collected at the end of the file or when the capture stops.
``finish()`` fuses everything into one ``device`` record per local device.

Each capture is counted in its own tables (``CaptureDevices``), merged into the run's at its end, in input
order (``add_capture_result``): so a flow record, its device link fields included, depends only on its own
capture, and captures analysed by other processes (iotscan.cluster) merge by the same code as here.

A local device is a MAC that sends traffic from a local address (records.is_local_address): the
initiator of a flow from a local address, or a local responder that answered. A DHCP client
before it has an address (0.0.0.0) is counted for the MAC too. A MAC that only relays Internet
traffic (the gateway, seen with remote addresses) owns none of them: remote addresses never enter
a device's ``ips``; if the gateway also speaks from its own local address it is a device, with the
"gateway" evidence.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotscan.capture.side_pass import SIDE_PASS_STOP_S, SidePass
from iotscan.devices.behaviour import PEER_GROUP, PEER_LOCAL, PEER_REMOTE, DeviceActivity
from iotscan.devices.fingerprint import DeviceEvidence, DeviceModel, fingerprint_devices
from iotscan.devices.identity import IdentityHints, identity_pass
from iotscan.devices.signatures import Signatures, load_signatures
from iotscan.output.records import is_local_address
from iotscan.stage import Event, SourceInfo, Stage

MAX_DEVICES = 4096  # a home or lab network; beyond it (spoofed floods), new MACs are not tracked
_MAX_CACHE = 65536
_MAX_IPS = 16  # local addresses kept per device
_UNSPECIFIED = 3


@dataclass
class CaptureDevices:
    """What the device stage counted over one capture, to merge into the run's tables (add_capture_result)."""

    devices: dict[str, DeviceActivity] = field(default_factory=dict)  # by MAC, local or not yet known to be
    gateways: dict[str, set[str]] = field(default_factory=dict)  # MAC -> the local devices it carries traffic of
    # Unanswered flows to a local MAC that was no device of this capture yet: it may be one of an earlier capture,
    # and then they count for it, as they would in one table (by MAC; the gateways that carried them)
    held: dict[str, DeviceActivity] = field(default_factory=dict)
    held_gateways: dict[str, set[str]] = field(default_factory=dict)
    hints: IdentityHints = field(default_factory=IdentityHints)
    warnings: list[dict[str, str]] = field(default_factory=list)
    identity_seconds: float = 0.0


class DeviceStage(Stage):
    """Aggregate flows per local device; emit device records at the end of the run."""

    def __init__(self, model: DeviceModel | None = None, *, use_model: bool = True,
                 model_path: Path | None = None, trust_model: bool = False, identity_pass: bool = True,
                 signatures: Signatures | None = None) -> None:
        super().__init__()
        self.signatures = signatures or load_signatures()
        self.model = model
        self._model_path: Path | None = None
        self._trust_model = trust_model
        if model is None and use_model:
            # Checked now (a missing or tampered model stops the run before it starts), unpickled in
            # finish(), once devices are to be fingerprinted: the meter processes fork from a process
            # that has not grown by a forest yet.
            self._model_path = DeviceModel.check(model_path, trusted=trust_model)
        self.identity_pass = identity_pass
        # the run's tables, the captures merged (see the module)
        self.devices: dict[str, DeviceActivity] = {}
        self.hints = IdentityHints()
        self.gateways: dict[str, set[str]] = {}  # MAC -> local devices whose Internet traffic it carries
        self.identity_seconds = 0.0
        self._capture = CaptureDevices()  # the current capture's
        self._ip_kind: dict[str, int] = {}
        self._unicast: dict[str, bool] = {}
        self._full = self._capture_full = False
        self._source = ""
        self._info: SourceInfo | None = None
        self._identity: SidePass | None = None
        self._loader: _ModelLoader | None = None

    def begin(self, source: SourceInfo) -> None:
        if self._loader is not None:
            self._loader.join()  # the next source's meter must not fork in the middle of an import
        self._abandon_identity()
        self._source = source.name
        self._info = source
        self._capture, self._capture_full = CaptureDevices(), False
        if source.config.live and self.model is None and self._model_path is not None:
            # Loaded before capturing: on a live link, a load beside the capture would hold the reader back.
            self.model = DeviceModel.load(self._model_path, trusted=self._trust_model)

    def _abandon_identity(self) -> None:
        """A pass still running here belongs to a source that failed: stop it, do not wait."""
        if self._identity is not None:
            self._identity.stop()
            self._identity = None

    def metering(self) -> None:
        self._start_identity()

    def _start_identity(self) -> None:
        """Start the identity pass beside the main one: its own meter process, fed by a thread that
        only waits for its few flows. Called once the main meter runs (so the forks do not race)."""
        info = self._info
        if not self.identity_pass or info is None or self._identity is not None:
            return
        job = identity_pass(info.config.source, info.config)
        job.start()
        self._identity = job

    # -- per flow ----------------------------------------------------------------------------------

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        observe = self.observer()
        for event in events:  # the first event: every stage has started its side pass (Stage.metering)
            if self.model is None and self._model_path is not None and self._loader is None:
                # Unpickled beside the metering, in the main process's idle time, now that the meters
                # have forked (a model made before iotscan kept its trees as arrays imports scikit-learn:
                # a second or more).
                self._loader = _ModelLoader(self._model_path, self._trust_model)
                self._loader.start()
            if event[0] is not None:  # not a heartbeat
                observe(event[0])
            yield event
            break
        for event in events:
            if event[0] is not None:
                observe(event[0])
            yield event

    def observer(self) -> Callable[[dict[str, Any]], None]:
        """The per-flow function: counts one flow record for its local endpoints and adds the device
        link fields to it. A closure over local names: this runs for every flow of the capture."""
        ip_kind, unicast, devices = self._ip_kind, self._unicast, self._capture.devices
        classify, classify_mac, new_device, carries = self._classify, self._classify_mac, self._new_device, \
            self._carries
        held, held_device = self._capture.held, self._held_device
        local, remote, group, unspecified = PEER_LOCAL, PEER_REMOTE, PEER_GROUP, _UNSPECIFIED

        def observe(r: dict[str, Any]) -> None:
            src_ip = r["src_ip"]
            dst_ip = r["dst_ip"]
            sk = ip_kind.get(src_ip)
            if sk is None:
                sk = classify(src_ip)
            dk = ip_kind.get(dst_ip)
            if dk is None:
                dk = classify(dst_ip)
            src_mac = r["src_mac"]
            dst_mac = r["dst_mac"]
            src_uni = unicast.get(src_mac)
            if src_uni is None:
                src_uni = classify_mac(src_mac)
            dst_uni = unicast.get(dst_mac)
            if dst_uni is None:
                dst_uni = classify_mac(dst_mac)
            src_dev = dst_dev = None
            if src_uni and (sk == local or (sk == unspecified and r["src_port"] == 68)):
                act = devices.get(src_mac) or new_device(src_mac)
                if act is not None:
                    if act.source is not self._source:
                        act.seen_in(self._source)
                    if sk == local:
                        act.sends_local = True
                        ips = act.ips
                        if src_ip in ips:
                            ips[src_ip] += 1
                        elif len(ips) < _MAX_IPS:
                            ips[src_ip] = 1
                        src_dev = src_mac
                        if dk == remote and dst_uni:
                            carries(dst_mac, src_mac)
                    act.add(r, True, dst_ip, dk if dst_uni and dk != unspecified else group)
            if dst_uni and dk == local and dst_mac != src_mac:
                act = devices.get(dst_mac)
                answered = r["dst2src_packets"] > 0
                if act is None:
                    act = new_device(dst_mac) if answered else held.get(dst_mac) or held_device(dst_mac)
                if act is not None:
                    if act.source is not self._source:
                        act.seen_in(self._source)
                    if answered:
                        act.sends_local = True
                        ips = act.ips
                        if dst_ip in ips:
                            ips[dst_ip] += 1
                        elif len(ips) < _MAX_IPS:
                            ips[dst_ip] = 1
                    act.add(r, False, src_ip, sk if src_uni and sk != unspecified else group)
                    if act.sends_local:
                        dst_dev = dst_mac
                    if sk == remote and src_uni:
                        carries(src_mac, dst_mac, act is held.get(dst_mac))
            r["src_device"] = src_dev
            r["dst_device"] = dst_dev

        return observe

    def _new_device(self, mac: str) -> DeviceActivity | None:
        devices = self._capture.devices
        if len(devices) >= MAX_DEVICES:
            if not self._capture_full:
                self._capture_full = True
                self._capture.warnings.append(_device_cap_warning(self._source))
            return None
        act = devices[mac] = DeviceActivity()
        return act

    def _held_device(self, mac: str) -> DeviceActivity | None:
        held = self._capture.held
        if len(held) >= MAX_DEVICES:
            return None
        act = held[mac] = DeviceActivity()
        return act

    def _carries(self, gateway: str, device: str, held: bool = False) -> None:
        """Note that ``gateway`` carries ``device``'s Internet traffic."""
        _carries(self._capture.held_gateways if held else self._capture.gateways, gateway, device)

    def _classify(self, ip: str) -> int:
        if len(self._ip_kind) >= _MAX_CACHE:
            self._ip_kind.clear()
        if is_local_address(ip):
            kind = PEER_LOCAL
        else:
            try:
                addr = ipaddress.ip_address(ip)
                kind = PEER_GROUP if addr.is_multicast else \
                    _UNSPECIFIED if addr.is_unspecified else PEER_REMOTE
            except ValueError:
                kind = _UNSPECIFIED
        self._ip_kind[ip] = kind
        return kind

    def _classify_mac(self, mac: str) -> bool:
        if len(self._unicast) >= _MAX_CACHE:
            self._unicast.clear()
        try:
            ok = len(mac) == 17 and not int(mac[:2], 16) & 1 and mac != "00:00:00:00:00:00"
        except ValueError:
            ok = False
        self._unicast[mac] = ok
        return ok

    # -- per source and at the end ----------------------------------------------------------------------

    def end(self, source: SourceInfo) -> None:
        """After a capture file, or a stopped capture of an interface: collect the DHCP/mDNS/SSDP
        self-descriptions of the identity pass (on an interface, a second capture: stopped now, it
        flushes the flows it still holds)."""
        if not self.identity_pass:
            return
        started = time.monotonic()
        self._start_identity()  # not started yet if the capture had no flow
        job, self._identity = self._identity, None
        if job is None:
            return
        ended = job.end()
        if (dropped := job.dropped()) is not None:
            self.warn(source.name, "dropped", dropped)
        if job.error is not None:
            self.warn(source.name, "identity_pass", f"DHCP/mDNS/SSDP pass failed (devices rely on flows): {job.error}")
        elif not ended:  # a stopped live pass: what it read is not waited for any longer
            self.warn(source.name, "identity_pass",
                      f"DHCP/mDNS/SSDP pass did not stop within {SIDE_PASS_STOP_S:g} s (devices rely on flows)")
        elif job.result is not None:
            self._capture.hints = job.result
        self._capture.identity_seconds += time.monotonic() - started

    def capture_result(self) -> CaptureDevices:
        """The capture's tables (and warnings), taken: the stage starts the next capture empty."""
        result, self._capture = self._capture, CaptureDevices()
        result.warnings.extend(super().capture_result())
        return result

    def add_capture_result(self, result: CaptureDevices) -> None:
        """Merge a capture's tables into the run's: captures in input order, by the same code whichever process
        counted them."""
        devices = self.devices
        for mac, act in result.held.items():  # before the capture's own: these flows came first
            known = devices.get(mac)
            if known is not None:
                known.merge(act)
                for gateway in sorted(result.held_gateways.get(mac, ())):
                    _carries(self.gateways, gateway, mac)
        for mac, act in result.devices.items():
            known = devices.get(mac)
            if known is not None:
                known.merge(act)
            elif len(devices) < MAX_DEVICES:
                devices[mac] = act
            elif not self._full:
                self._full = True
                self.warnings.append(_device_cap_warning(""))
        for gateway, served in result.gateways.items():
            for device in sorted(served):
                _carries(self.gateways, gateway, device)
        self.hints.merge(result.hints)
        self.identity_seconds += result.identity_seconds
        self.warnings.extend(result.warnings)

    def profiles(self) -> dict[str, DeviceActivity]:
        """The local devices (MACs that sent from a local address) and their activity."""
        return {mac: act for mac, act in self.devices.items() if act.sends_local}

    def finish(self) -> list[dict[str, Any]]:
        self._abandon_identity()
        served_by = {mac: len(devs - {mac}) for mac, devs in self.gateways.items()}
        devices = []
        for mac, act in self.profiles().items():
            served = served_by.get(mac, 0)
            ips = _device_ips(act, served, self.gateways, self.devices)
            devices.append(DeviceEvidence(mac, act, self.hints.by_mac.get(mac), ips, served))
        if self.model is None and self._model_path is not None and devices:
            if self._loader is not None:
                self.model = self._loader.result()
            else:
                self.model = DeviceModel.load(self._model_path, trusted=self._trust_model)
        records = fingerprint_devices(devices, self.signatures, self.model)
        records.sort(key=lambda d: (d["first_seen_ms"], d["mac"]))
        return records

def _device_cap_warning(source: str) -> dict[str, str]:
    return {"source": source, "code": "device_cap",
            "message": f"more than {MAX_DEVICES:,} local MACs: later ones are not fingerprinted (spoofed source MACs?)"}


def _carries(gateways: dict[str, set[str]], gateway: str, device: str) -> None:
    """Note that ``gateway`` carries ``device``'s Internet traffic (tables bounded as the devices are)."""
    served = gateways.get(gateway)
    if served is None:
        if len(gateways) >= MAX_DEVICES:
            return
        served = gateways[gateway] = set()
    if len(served) < MAX_DEVICES:
        served.add(device)


def _device_ips(act: DeviceActivity, served: int, gateways: dict[str, set[str]],
                devices: dict[str, DeviceActivity]) -> list[str]:
    """The device's local addresses, most used first.

    A router also shows the addresses of other subnets it routes (their traffic carries its MAC):
    when it serves local devices, only addresses in their /24 (IPv4) or /64 (IPv6) are its own.
    """
    ips = sorted(act.ips, key=lambda ip: -act.ips[ip])
    if not served or len(ips) < 2:
        return ips
    prefixes = set()
    for mac, devs in gateways.items():
        if act is devices.get(mac):
            for dev in devs:
                other = devices.get(dev)
                if other is not None and other is not act:
                    prefixes.update(_prefix(ip) for ip in other.ips)
    own = [ip for ip in ips if _prefix(ip) in prefixes or ip.startswith("fe80:")]
    return own or ips


def _prefix(ip: str) -> str:
    if ":" in ip:
        return ":".join(ipaddress.ip_address(ip).exploded.split(":")[:4])
    return ip.rsplit(".", 1)[0]


class _ModelLoader(threading.Thread):
    """Loads (and verifies) the device model in a thread; ``result()`` waits for it."""

    def __init__(self, path: Path, trusted: bool) -> None:
        super().__init__(name="iotscan-device-model", daemon=True)
        self.path = path
        self.trusted = trusted
        self.model: DeviceModel | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.model = DeviceModel.load(self.path, trusted=self.trusted)
        except Exception as exc:  # raised again in the main thread by result()
            self.error = exc

    def result(self) -> DeviceModel:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.model is not None
        return self.model
