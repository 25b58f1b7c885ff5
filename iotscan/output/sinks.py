"""The sink stage: records out as NDJSON, one JSON document or CSV; tables for a person are table.py's.

Every sink streams: flows are written as they come; only bounded things (the busiest flows for
the table, device records, counters) are held until the end. A record of a type a sink does not
know (alerts, floods of later stages) passes through NDJSON and JSON, and is left out of CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import IO, Any, Protocol

import orjson

from iotscan.output.records import FLOW_FIELD_NAMES
from iotscan.output.table import TableSink

FORMATS = ("table", "ndjson", "json", "csv")
_ORJSON_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any]) -> None: ...


def dumps(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=_ORJSON_OPTS)


class NdjsonSink:
    """One JSON object per line; flushed per line when a pipeline reads it live."""

    def __init__(self, out: IO[bytes], flush_each: bool = False) -> None:
        self.out = out
        self.flush_each = flush_each

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(dumps(record))
        if self.flush_each:
            self.out.flush()

    def write_lines(self, lines: bytes) -> None:
        """Records already written as NDJSON elsewhere, whole lines (iotscan.cluster: a worker's), as they are."""
        self.out.write(lines)
        if self.flush_each:
            self.out.flush()

    def close(self, summary: dict[str, Any]) -> None:
        self.write(summary)
        self.out.flush()


class JsonSink:
    """One document, {"flows": [...], "devices": [...], "summary": {...}}, with flows streamed into it."""

    def __init__(self, out: IO[bytes], stream_type: str = "flow") -> None:
        self.out = out
        self.stream_key = _plural(stream_type)
        self.stream_type = stream_type
        self.count = 0
        self.others: dict[str, list[dict[str, Any]]] = {}
        self.out.write(b'{"' + self.stream_key.encode() + b'":[')

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type", "record")
        if kind != self.stream_type:
            self.others.setdefault(_plural(kind), []).append(record)  # devices, stats: few of them
            return
        if self.count:
            self.out.write(b",\n")
        self.out.write(orjson.dumps(record))
        self.count += 1

    def close(self, summary: dict[str, Any]) -> None:
        self.out.write(b"]")
        for key, records in self.others.items():
            self.out.write(b',"' + key.encode() + b'":' + orjson.dumps(records))
        self.out.write(b',"summary":' + orjson.dumps(summary) + b"}\n")
        self.out.flush()


def _plural(event_type: str) -> str:
    return event_type if event_type.endswith("s") else event_type + "s"


class CsvSink:
    """Rows of one record type with a header; lists are joined with "; "."""

    def __init__(self, out: IO[bytes], columns: Sequence[str], row_type: str = "flow") -> None:
        self.out = out
        self.text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self.columns = list(columns)
        self.row_type = row_type
        self.writer = csv.writer(self.text)
        if not _appending_to_content(out):  # a file appended to (live -o) has its header already
            self.writer.writerow(self.columns)

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event_type") != self.row_type:
            return
        row = []
        for name in self.columns:
            value = record.get(name)
            if value is None:
                value = ""
            elif isinstance(value, list):
                value = "; ".join(v if isinstance(v, str) else orjson.dumps(v).decode() for v in value)
            elif isinstance(value, dict):
                value = orjson.dumps(value).decode()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            row.append(value)
        self.writer.writerow(row)

    def close(self, summary: dict[str, Any]) -> None:
        self.text.flush()
        self.text.detach()
        self.out.flush()


def _appending_to_content(out: IO[bytes]) -> bool:
    try:
        return out.seekable() and out.tell() > 0
    except (OSError, ValueError):
        return False


def make_sink(fmt: str, out: IO[bytes], *, columns: Sequence[str] = FLOW_FIELD_NAMES, row_type: str = "flow",
              flush_each: bool = False, inspect_args: Sequence[str] = ()) -> Sink:
    if fmt == "ndjson":
        return NdjsonSink(out, flush_each=flush_each)
    if fmt == "json":
        return JsonSink(out, stream_type=row_type)
    if fmt == "csv":
        return CsvSink(out, columns, row_type=row_type)
    return TableSink(out, inspect_args=inspect_args)
