"""Options and output plumbing shared by the commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import IO

import typer

from iotscan.errors import InputError
from iotscan.pipeline import Stage


class Format(str, Enum):
    table = "table"
    ndjson = "ndjson"
    json = "json"
    csv = "csv"


_SUFFIX_FORMATS = {".csv": Format.csv, ".json": Format.json, ".ndjson": Format.ndjson, ".jsonl": Format.ndjson}

FORMAT_OPTION = typer.Option(None, "--format", "-f", case_sensitive=False,
                             help="Output format. Default: table on a terminal, else ndjson "
                                  "(with -o, from the file's suffix).")
OUTPUT_OPTION = typer.Option(None, "--output", "-o", dir_okay=False,
                             help="Write records to FILE instead of stdout.")
BPF_OPTION = typer.Option(None, "--bpf", help="BPF filter applied before metering, e.g. 'not port 53'.")
IDLE_OPTION = typer.Option(120, "--idle-timeout", min=1, help="Seconds without packets after which a flow ends.")
ACTIVE_OPTION = typer.Option(1800, "--active-timeout", min=1, help="Seconds after which a long flow is cut.")
MAX_FLOWS_OPTION = typer.Option(
    500_000, "--max-flows", min=0,
    help="Most flows tracked at once (bounds memory on floods); when full, the least recently active "
         "flow is expired early and a warning says so. 0: no cap.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars or warnings on stderr.")


def resolve_format(fmt: Format | None, output: Path | None) -> Format:
    if fmt is not None:
        return fmt
    if output is not None:
        return _SUFFIX_FORMATS.get(output.suffix.lower(), Format.ndjson)
    return Format.table if sys.stdout.isatty() else Format.ndjson


def open_output(output: Path | None, inputs: Sequence[str | os.PathLike[str]] = (), append: bool = False) -> IO[bytes]:
    """stdout, or FILE; refuses to write over any input the user gave."""
    if output is None:
        return sys.stdout.buffer
    for given in inputs:
        try:
            if Path(given).is_file() and output.exists() and os.path.samefile(given, output):
                raise InputError(f"{output}: refusing to overwrite an input capture with output")
        except OSError:
            continue
    try:
        return output.open("ab" if append else "wb")
    except OSError as exc:
        raise InputError(f"{output}: cannot write output: {exc.strerror or exc}") from exc


def build_stages() -> list[Stage]:
    """The enrichment and scoring stages shared by `analyze` and `live`, in pipeline order."""
    stages: list[Stage] = []
    return stages
