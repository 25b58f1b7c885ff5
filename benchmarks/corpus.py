"""Build the benchmark captures from the nDPI corpus: real traffic of hundreds of protocols.

Every Ethernet capture of ../shared/pcaps/ndpi (about 78,000 packets in all) is time-shifted with
editcap so that the files follow each other (as one long capture would), then concatenated with
mergecap; the result is repeated, each copy shifted after the previous one, to reach the wanted
length. Files nDPI merged from captures days apart, or with made-up timestamps, are left out.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NDPI = REPO.parent / "shared" / "pcaps" / "ndpi"
OUT = REPO / "benchmarks" / "out"
GAP_S = 1.0  # seconds between concatenated files
MAX_SPAN_S = 86400  # skip files whose packets span more than a day: nDPI merged them from several captures
EPOCH_2000 = 946684800  # and files with made-up timestamps before 2000


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _times(path: Path) -> tuple[str, float, float] | None:
    """(encapsulation, first, last packet time) from capinfos, None if unreadable or empty."""
    proc = subprocess.run(["capinfos", "-T", "-r", "-E", "-a", "-e", "-S", str(path)], capture_output=True, text=True)
    fields = proc.stdout.strip().split("\t")
    if len(fields) < 4:
        return None
    try:
        return fields[1], float(fields[2]), float(fields[3])
    except ValueError:
        return None


def _concatenate(parts: list[Path], times: list[tuple[float, float]], target: Path) -> float:
    """Shift each part to follow the previous one and concatenate; return the duration."""
    shifted_dir = target.with_suffix(".parts")
    shifted_dir.mkdir(parents=True, exist_ok=True)
    cursor = 0.0
    shifted = []
    for i, (part, (first, last)) in enumerate(zip(parts, times, strict=True)):
        out = shifted_dir / f"{i:05d}.pcap"
        _run("editcap", "-F", "pcap", "-t", f"{cursor - first:.6f}", str(part), str(out))
        shifted.append(str(out))
        cursor += (last - first) + GAP_S
    _run("mergecap", "-a", "-F", "pcap", "-w", str(target), *shifted)
    shutil.rmtree(shifted_dir)
    return cursor


def build(copies: int) -> Path:
    """The nDPI Ethernet corpus, concatenated `copies` times; cached in benchmarks/out."""
    if not NDPI.is_dir():
        raise SystemExit(f"{NDPI} is absent: the benchmark needs the shared nDPI captures")
    for tool in ("capinfos", "editcap", "mergecap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install wireshark-common (./install.sh does)")
    OUT.mkdir(parents=True, exist_ok=True)
    base = OUT / "ndpi-ether-unit.pcap"
    if not base.exists():
        parts, times = [], []
        for path in sorted(NDPI.glob("*.pcap*")):
            info = _times(path)
            if info and info[0] == "ether" and EPOCH_2000 <= info[1] <= info[2] <= info[1] + MAX_SPAN_S:
                parts.append(path)
                times.append((info[1], info[2]))
        _concatenate(parts, times, base)
    target = OUT / f"ndpi-ether-{copies}x.pcap"
    if not target.exists():
        info = _times(base)
        assert info is not None
        _concatenate([base] * copies, [(info[1], info[2])] * copies, target)
    return target


if __name__ == "__main__":
    import sys

    print(build(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
