"""`iotscan analyze`: captures in, records out."""

from __future__ import annotations

from pathlib import Path

import typer

from iotscan.cli import app
from iotscan.cli.common import (
    ACTIVE_OPTION,
    BPF_OPTION,
    FORMAT_OPTION,
    IDLE_OPTION,
    MAX_FLOWS_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    Format,
    build_stages,
    open_output,
    resolve_format,
)
from iotscan.console import Reporter
from iotscan.pipeline import Analysis
from iotscan.records import FLOW_FIELD_NAMES
from iotscan.sinks import make_sink
from iotscan.source import MeterConfig


@app.command()
def analyze(
    paths: list[Path] = typer.Argument(..., help="Capture files (pcap, pcapng) or directories of them."),
    fmt: Format | None = FORMAT_OPTION,
    output: Path | None = OUTPUT_OPTION,
    bpf: str | None = BPF_OPTION,
    idle_timeout: int = IDLE_OPTION,
    active_timeout: int = ACTIVE_OPTION,
    max_flows: int = MAX_FLOWS_OPTION,
    quiet: bool = QUIET_OPTION,
    fail_on: str | None = typer.Option(
        None, "--fail-on",
        help="Exit 1 when a flow is an attack ('attack') or of one family (ddos, dos, scan, bruteforce, c2, "
             "exploit, spoofing)."),
) -> None:
    """Extract every flow of the captures, fingerprint devices and score flows, in one pass."""
    fmt = resolve_format(fmt, output)
    out = open_output(output, paths)
    sink = make_sink(fmt.value, out, columns=FLOW_FIELD_NAMES)
    config = MeterConfig(source="", bpf=bpf, idle_timeout=idle_timeout, active_timeout=active_timeout,
                         max_flows=max_flows)
    analysis = Analysis(sink, stages=build_stages(), reporter=Reporter(quiet), fail_on=fail_on)
    try:
        analysis.run_files(paths, config)
    finally:
        analysis.finish()
        if out is not None and output is not None:
            out.close()
    raise typer.Exit(int(analysis.exit_code()))
