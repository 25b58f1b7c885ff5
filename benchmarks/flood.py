"""A synthetic capture of a million flows: a spoofed TCP SYN flood, one packet per random source.

This is the hostile input --max-flows is for: every packet opens a new flow and no flow ever
ends before the idle time-out, so without a cap the flow table grows with the capture.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from corpus import OUT

_ETH = bytes.fromhex("020000000001" "020000000002" "0800")
_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def build(flows: int = 1_000_000, pps: int = 20_000, seed: int = 7) -> Path:
    """SYNs from `flows` distinct spoofed sources to one victim port, at `pps` packets per second."""
    path = OUT / f"synflood-{flows}.pcap"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    victim = bytes([10, 0, 0, 10])
    start = 1_700_000_000.0
    with path.open("wb") as f:
        f.write(_PCAP_HEADER)
        for i in range(flows):
            src = (0x0B000000 + i).to_bytes(4, "big")  # 11.x.y.z: every packet a new source
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, rng.getrandbits(16), 0, 64, 6, 0, src, victim)
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
            tcp = struct.pack("!HHIIBBHHH", rng.randint(1024, 65535), 80, rng.getrandbits(32), 0, 0x50, 0x02,
                              1024, 0, 0)
            frame = _ETH + ip + tcp
            ts = start + i / pps
            f.write(struct.pack("<IIII", int(ts), int((ts % 1) * 1e6), len(frame), len(frame)) + frame)
    return path


if __name__ == "__main__":
    print(build())
