"""The records `iotscan inspect` writes: the flow's record, then one flat ``packet`` record per packet
(frame facts and each dissected layer's fields), then the summary.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any

from iotscan.capture.source import MeterConfig
from iotscan.errors import InputError
from iotscan.inspect.fields import _REASSEMBLY, LAYER_FIELDS, _Fields, _is_hex, _label
from iotscan.inspect.selection import FlowLookup, FlowSelector, find_flows
from iotscan.inspect.tshark import ReadStats, Tools, _timestamp_ms, dissect_frames, select_frames
from iotscan.output.records import iso_timestamp_text, summary_record


def read_flow_packets(tools: Tools, capture: str, lookup: FlowLookup, stats: ReadStats, *, limit: int = 0,
                      payload: bool = False, any_time: bool = False) -> Iterator[dict[str, Any]]:
    """Packet records of the flows, in capture order: tshark selects their frames (select_frames), then
    dissects only those (dissect_frames)."""
    flows = lookup.flows
    stats.expected = sum(f.record["packets"] for f in flows)
    records = [f.record for f in flows]
    frames = select_frames(tools, capture, lookup, stats, limit=limit, any_time=any_time)
    for packet, numbers in dissect_frames(tools, capture, frames):
        record = packet_record(packet, _owner(packet, records), payload=payload, frame_numbers=numbers)
        stats.packets += 1
        yield record
    if stats.packets != len(frames):
        stats.warnings.append(f"tshark dissected {stats.packets:,} of the {len(frames):,} frames it selected")
    if not stats.limited and stats.packets != stats.expected and not (any_time and stats.packets > stats.expected):
        stats.warnings.append(
            f"tshark matched {stats.packets:,} packets, the flow record{'s' if len(flows) > 1 else ''} count "
            f"{stats.expected:,}: the capture's timestamps may step back (NFStream then counts a packet at the newest "
            "time seen), packets may be duplicated, or IP fragments were reassembled"
            + ("; --any-time drops the time window" if stats.packets < stats.expected and not any_time else ""))


def _owner(packet: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The flow a packet belongs to, when one filter covers several flows of one 5-tuple."""
    if len(records) == 1:
        return records[0]
    ms = _timestamp_ms(packet.sniff_timestamp)
    for r in records:
        if r["first_seen_ms"] <= ms <= r["last_seen_ms"]:
            return r
    # Outside every window (time stepped back): the flow that starts next, else the last one.
    later = [r for r in records if r["first_seen_ms"] > ms]
    return later[0] if later else records[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def inspect_capture(capture: str, selector: FlowSelector, config: MeterConfig, tools: Tools, sink: Any, *,
                    pick: int | None = None, limit: int = 0, payload: bool = False, any_time: bool = False,
                    warn: Any = None) -> bool:
    """The whole of `iotscan inspect` but option parsing: find the flows, write each flow record before
    its packets, then the summary. Returns False when interrupted (Ctrl-C, or SIGTERM raised as one).

    ``capture`` is the capture as the user named it (flow ids and messages use it); the file read is
    ``config.source`` (the same, or a decompressed copy). ``pick``: of several matching flows, the N-th
    (1-based); ``warn``: called with each warning for a person (the summary carries them too).
    """
    started = time.monotonic()
    try:  # a prefix must be looked for in every flow: it names a flow only when no other shares it
        lookup = find_flows(capture, selector, config, stop_after=0 if selector.flow_id_prefix else pick or 0)
    except KeyboardInterrupt:
        message = "interrupted by the user while looking for the flow"
        if warn is not None:
            warn(message)
        sink.close(summary_record(packets=0, flows=0, elapsed_s=round(time.monotonic() - started, 3), errors=[],
                                  warnings=[{"source": capture, "code": "interrupted", "message": message}],
                                  inputs=[{"source": capture, "packets": 0, "flows": 0, "status": "interrupted"}]))
        return False
    found = lookup.flows
    if not found:
        hint = " (flow ids depend on the capture's file name and on analyze's --idle-timeout and --active-timeout)" \
            if selector.flow_id is not None or selector.flow_id_prefix is not None else ""
        raise InputError(f"no flow with {selector.describe()} in {capture}{hint}")
    if selector.flow_id_prefix is not None and len(found) > 1:
        ids = ", ".join(str(f.record["flow_id"]) for f in found[:5]) + (", ..." if len(found) > 5 else "")
        raise InputError(f"flow id prefix {selector.flow_id_prefix} is ambiguous in {capture}: {len(found)} flows "
                         f"start with it ({ids}); give more digits")
    warnings: list[dict[str, str]] = []
    if pick is not None:
        if pick > len(found):
            matches = _plural(len(found), "flow")
            raise InputError(f"{selector.describe()} matches {matches} in {capture}: --index {pick} is out of range")
        found = lookup.flows = [found[pick - 1]]
    elif len(found) > 1:
        warnings.append({"source": capture, "code": "several_flows", "message": (
            f"{selector.describe()} matches {len(found)} flows in {capture} (the same 5-tuple at different times): "
            "showing all of them; --index N or --first picks one")})
    stats = ReadStats()
    interrupted = False
    packets = read_flow_packets(tools, config.source, lookup, stats, limit=limit, payload=payload,
                                any_time=any_time)
    try:
        shown: set[int] = set()
        for packet in packets:
            if packet["flow_id"] not in shown:
                shown.add(packet["flow_id"])
                sink.write(next(f.record for f in found if f.record["flow_id"] == packet["flow_id"]))
            sink.write(packet)
        for f in found:  # a flow tshark found no packet of still gets its record
            if f.record["flow_id"] not in shown:
                sink.write(f.record)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        packets.close()  # ends tshark now, whatever happened
        warnings += [{"source": capture, "code": "packets", "message": m} for m in stats.warnings]
        if interrupted:
            warnings.append({"source": capture, "code": "interrupted",
                             "message": "interrupted by the user: packets are partial"})
        if warn is not None:
            for w in warnings:
                warn(w["message"])
        elapsed = time.monotonic() - started
        sink.close(summary_record(
            packets=stats.packets, flows=len(found), elapsed_s=round(elapsed, 3),
            packets_per_s=round(stats.packets / elapsed, 1) if elapsed else 0.0, warnings=warnings, errors=[],
            inputs=[{"source": capture, "packets": stats.packets, "flows": len(found),
                     "status": "interrupted" if interrupted else "ok"}],
            display_filter=stats.display_filter, limited=stats.limited))
    return not interrupted


# -- packet records -------------------------------------------------------------------------------



def packet_record(packet: Any, flow: dict[str, Any], payload: bool = False,
                  frame_numbers: list[int] | None = None) -> dict[str, Any]:
    """The flat record of one pyshark Packet of a flow: frame facts, then each dissected layer's fields.
    ``frame_numbers``: when tshark read an extract of the capture, the capture's number of each of its frames."""
    renumber = (lambda n: frame_numbers[n - 1]) if frame_numbers is not None else (lambda n: n)
    raw_ts = str(packet.sniff_timestamp)
    layers = [layer.layer_name for layer in packet.layers if layer.layer_name != _REASSEMBLY]
    record: dict[str, Any] = {
        "timestamp": iso_timestamp_text(raw_ts),
        "event_type": "packet",
        "flow_id": flow["flow_id"],
        "community_id": flow["community_id"],
        "source": flow["source"],
        "frame_number": renumber(int(packet.number)),
        "timestamp_ms": _timestamp_ms(raw_ts),
        "direction": None,
        "length": int(packet.length),
        "captured_length": int(packet.captured_length),
        "layers": layers,
    }
    fields = [_Fields(layer) for layer in packet.layers]
    record["direction"] = _direction(fields, flow)
    expert: list[str] = []
    for f in fields:
        extract = LAYER_FIELDS.get(f.name)
        if extract is not None:
            extract(f, record)
        expert.extend(_expert_messages(f))
    if expert:
        record["expert"] = expert
    if "reassembled_frames" in record:
        record["reassembled_frames"] = [renumber(n) for n in record["reassembled_frames"]]
    if payload:
        record["payload_hex"] = _payload_hex(fields)
    return record


def _expert_messages(f: _Fields) -> list[str]:
    """tshark's warnings and errors about the packet (malformed, previous segment not captured...); notes and
    chats (retransmissions, connection setup) are left out."""
    messages = []
    for expert, severity in zip(f.all("_ws.expert.message"), f.all("_ws.expert.severity"), strict=False):
        level = _label(severity) or ""
        if level in ("Warning", "Error") and expert.show:
            messages.append(f"{level.lower()}: {expert.show}")
    return list(dict.fromkeys(messages))


def _direction(fields: list[_Fields], flow: dict[str, Any]) -> str | None:
    """src2dst when the packet goes from the flow's initiator; the innermost IP header decides (tunnels)."""
    src, dst = flow["src_ip"], flow["dst_ip"]
    src_port, dst_port = flow["src_port"], flow["dst_port"]
    ips = [f for f in fields if f.name in ("ip", "ipv6")]
    ports = [f for f in fields if f.name in ("tcp", "udp", "sctp")]
    for ip in reversed(ips):
        a, b = ip.show(f"{ip.name}.src"), ip.show(f"{ip.name}.dst")
        if a is None or b is None:
            continue
        a, b = _norm_ip(a), _norm_ip(b)
        if (a, b) == (src, dst) and (a, b) != (dst, src):
            return "src2dst"
        if (a, b) == (dst, src) and (a, b) != (src, dst):
            return "dst2src"
        if a == b == src == dst:  # the same host on both ends: the ports decide
            if not ports or src_port == dst_port:
                return "src2dst"  # nothing tells the ends apart; NFStream counts every packet this way
            sp = ports[-1].int(f"{ports[-1].name}.srcport")
            dp = ports[-1].int(f"{ports[-1].name}.dstport")
            if (sp, dp) == (src_port, dst_port):
                return "src2dst"
            if (sp, dp) == (dst_port, src_port):
                return "dst2src"
    return None


def _norm_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _payload_hex(fields: list[_Fields]) -> str:
    """The transport payload (what follows the TCP/UDP header; the data of other protocols) as hex; "" if none."""
    for name in ("tcp.payload", "udp.payload", "data.data"):
        for f in reversed(fields):
            found = f.first(name)
            if found is not None and found.raw_value and _is_hex(found.raw_value):
                return found.raw_value.lower()
    return ""
