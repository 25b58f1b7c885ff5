"""`iotscan lab`: generate labeled attack and benign captures in isolated network namespaces."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from iotscan.cli import app
from iotscan.errors import CaptureError
from iotscan.output.console import stderr

lab_app = typer.Typer(name="lab", no_args_is_help=True, add_completion=False,
                      help="Attack lab: record real attack tools and IoT services in isolated network namespaces.")
app.add_typer(lab_app, name="lab")


@lab_app.command("generate")
def generate(
    out_dir: Path = typer.Argument(..., file_okay=False, help="Folder for the pcaps, MANIFEST.csv and README.md."),
    scenarios: str | None = typer.Option(
        None, "--scenarios", "-s",
        help="Comma-separated scenario names, families (scan, dos...), 'benign', or prefixes ending in '-' "
             "(default: all; see `iotscan lab list`)."),
    seed: int = typer.Option(1, "--seed", help="Draws addresses, credentials, rates and choices; same seed, "
                                               "same lab."),
    duration_scale: float = typer.Option(1.0, "--duration-scale",
                                         help="Multiply every scenario's duration and packet budget (0.1 = quick)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT_DIR, replacing lab files."),
    count: bool = typer.Option(True, "--count/--no-count", help="Count flows per label in each capture at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Build the lab (as root), run the scenarios, write one pcap each and OUT_DIR/MANIFEST.csv."""
    from iotscan.lab.run import Options, command_line
    from iotscan.lab.run import generate as run_generate

    names = [s.strip() for s in scenarios.split(",") if s.strip()] if scenarios else None
    options = Options(out_dir=out_dir, scenarios=names, seed=seed, duration_scale=duration_scale, force=force,
                      count_flows=count, command_line=command_line())

    def progress(message: str) -> None:
        if not quiet:
            stderr.print(message, highlight=False, markup=False)

    report = run_generate(options, progress)
    for r in report.results:
        flows = ", ".join(f"{k} {v}" for k, v in sorted(r.flows.items()))
        typer.echo(f"{r.name:24} {r.family or r.label:10} {r.packets or 0:>8} packets {r.pcap_bytes / 1e6:7.2f} MB"
                   f"  {flows}")
    typer.echo(f"{len(report.results)} captures, {report.total_bytes / 1e6:.1f} MB in {report.seconds:.0f} s; "
               f"manifest: {report.out_dir / 'MANIFEST.csv'}")


@lab_app.command("check")
def check(
    scenarios: str | None = typer.Option(None, "--scenarios", "-s", help="Check only what these scenarios need."),
) -> None:
    """Say which lab tools and Debian packages are missing, and how to install them."""
    from iotscan.lab.run import needed_tools, resolve_scenarios
    from iotscan.lab.tools import TOOL_PACKAGES, install_command, missing_tools, packages_for

    names = [s.strip() for s in scenarios.split(",") if s.strip()] if scenarios else None
    tools = needed_tools(resolve_scenarios(names))
    missing = set(missing_tools(tools))
    for tool in tools:
        typer.echo(f"{'missing' if tool in missing else 'ok':8} {tool:20} ({TOOL_PACKAGES.get(tool, tool)})")
    typer.echo(f"root: {'yes' if os.geteuid() == 0 else 'no (iotscan lab generate needs root)'}")
    if missing:
        packages = packages_for(missing)
        raise CaptureError(f"missing Debian packages: {' '.join(packages)}; install them with: "
                           f"{install_command(packages)}")
    typer.echo("all lab tools are installed")


@lab_app.command("list")
def list_scenarios() -> None:
    """List the scenario catalogue: name, label, family, nominal seconds, what it does."""
    from iotscan.lab.scenarios import CATALOGUE

    for sc in CATALOGUE.values():
        label = "per-flow" if sc.mixed else sc.label
        typer.echo(f"{sc.name:24} {label:8} {sc.family or '-':10} {sc.seconds:>4.0f}s  {sc.description}")
    typer.echo(f"{len(CATALOGUE)} scenarios, about {sum(s.seconds for s in CATALOGUE.values()) / 60:.0f} minutes "
               "of traffic at --duration-scale 1")
