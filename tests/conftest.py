"""Shared test fixtures: where the data is, and how to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
SHARED = Path(os.environ.get("IOTSCAN_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"
NDPI_PCAPS = SHARED / "pcaps" / "ndpi"


def require_shared(*parts: str) -> Path:
    """The path under ../shared, or skip the test with the reason (a user's clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets are not next to this checkout")
    return path


def run_iotscan(*args: str | os.PathLike[str], timeout: float = 300, check_code: int | None = None,
                **kwargs) -> subprocess.CompletedProcess[bytes]:
    """Run the real CLI (`python -m iotscan`) from the source tree, as a user would, capturing output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("IOTSCAN_DEBUG", None)
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run([sys.executable, "-m", "iotscan", *map(str, args)], capture_output=True, timeout=timeout,
                          env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)
    if check_code is not None:
        assert proc.returncode == check_code, (proc.returncode, proc.stderr.decode(errors="replace")[-2000:])
    return proc


def ndjson(stdout: bytes) -> list[dict]:
    """Parse NDJSON strictly: every line must be one JSON object."""
    records = []
    for line in stdout.splitlines():
        record = orjson.loads(line)
        assert isinstance(record, dict)
        records.append(record)
    return records


def assert_no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]


def dns_query_message(name: str, qtype: int = 1, flags: int = 0x0100) -> bytes:
    """A DNS message with one question (a standard query asking for recursion, by default)."""
    qname = b"".join(bytes([len(label)]) + label.encode("latin-1") for label in name.split(".") if label) + b"\0"
    return b"\x12\x34" + flags.to_bytes(2, "big") + b"\0\x01\0\0\0\0\0\0" + qname + qtype.to_bytes(2, "big") + b"\0\x01"
