"""`iotscan inspect`: one flow of a capture, down to its packets."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer

from iotscan.capture.inputs import InputProblem, capture_file
from iotscan.capture.source import MeterConfig
from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    FORMAT_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    Format,
    open_output,
    resolve_format,
)
from iotscan.errors import ExitCode, InputError
from iotscan.inspect import FlowSelector, PacketTableSink, find_tshark, inspect_capture
from iotscan.output.console import Reporter
from iotscan.output.sinks import JsonSink, NdjsonSink, Sink


@app.command("inspect")
def inspect_flow(
    capture: Path = typer.Argument(..., help="The capture file (pcap, pcapng) the flow was seen in."),
    flow: str | None = typer.Argument(
        None, metavar="[FLOW]",
        help="A flow_id from `iotscan analyze` (or its first digits, at least 6, as the table shows them: they must "
             "name one flow of the capture), a community_id, or a 5-tuple (as --5tuple)."),
    five_tuple: str | None = typer.Option(
        None, "--5tuple", metavar="SRC:PORT-DST:PORT/PROTO",
        help="Find the flow by its addresses (either direction; IPv6 in brackets: "
             "[fe80::1]:5353-[ff02::fb]:5353/udp). With FLOW too: only that 5-tuple's packets are metered "
             "to find FLOW, much faster on a large capture."),
    index: int | None = typer.Option(
        None, "--index", min=1,
        help="A community_id or 5-tuple can match several flows (the same 5-tuple at different times): "
             "show only the N-th, in time order. Default: all of them."),
    first: bool = typer.Option(False, "--first", help="Same as --index 1."),
    fmt: Format | None = FORMAT_OPTION,
    output: Path | None = OUTPUT_OPTION,
    limit: int = typer.Option(0, "--limit", "-n", min=0, help="Show at most N packets (0: all)."),
    payload: bool = typer.Option(
        False, "--payload", help="Add each packet's payload: a hex/ASCII dump (payload_hex in JSON)."),
    any_time: bool = typer.Option(
        False, "--any-time",
        help="Match the 5-tuple at any time, not only in the flow's time window (for captures whose "
             "timestamps step back)."),
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Show the packets of one flow, dissected by tshark: layers, DNS, HTTP, TLS, MQTT, DHCP... fields.

    Flow ids depend on the flow meter's timeouts: use the --idle-timeout and --active-timeout that
    analyze ran with. Needs tshark (sudo apt-get install tshark); exit code 3 when it is missing.
    """
    fmt = resolve_format(fmt, output)
    if fmt == Format.csv:
        raise InputError("inspect writes table, ndjson or json (packets have no fixed columns for CSV)")
    if first and index not in (None, 1):
        raise InputError("give either --first or --index, not both")
    selector = FlowSelector.parse(flow, five_tuple)
    item = capture_file(capture)  # a compressed capture, stdin or a pipe: a temporary copy
    if isinstance(item, InputProblem):
        raise InputError(f"{item.path}: {item.message}")
    config = MeterConfig(source=str(item.path), idle_timeout=idle_timeout, active_timeout=active_timeout,
                         max_flows=max_flows, statistics=False)
    try:
        tools = find_tshark()  # before the flow pass: no point metering without tshark
        out = open_output(output, [capture])
        try:
            with _sigterm_as_interrupt():
                completed = inspect_capture(item.display_name, selector, config, tools, _make_sink(fmt, out),
                                            pick=1 if first else index, limit=limit, payload=payload,
                                            any_time=any_time,
                                            # the table's footer shows the warnings; else stderr, on a terminal
                                            warn=None if fmt == Format.table else Reporter(quiet).warn)
        finally:
            if output is not None:
                out.close()
    finally:
        if item.spooled:
            item.path.unlink(missing_ok=True)
    if not completed:
        raise typer.Exit(int(ExitCode.INTERRUPTED))


def _make_sink(fmt: Format, out: Any) -> Sink:
    if fmt == Format.ndjson:
        return NdjsonSink(out, flush_each=True)
    if fmt == Format.json:
        return JsonSink(out, stream_type="packet")
    return PacketTableSink(out)


class _sigterm_as_interrupt:
    """SIGTERM ends inspect like Ctrl-C: tshark and the flow meter are cleaned up on the way out."""

    def __enter__(self) -> None:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            self.previous = None

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
