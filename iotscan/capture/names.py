"""Names a capture shows (DNS, SNI, HTTP host): which registered domain a name belongs to."""

from __future__ import annotations

import re

_IP_LITERAL = re.compile(r"^[0-9.]+$|^[0-9a-f:]+$", re.IGNORECASE)
_REVERSE = (".in-addr.arpa", ".ip6.arpa")
# second-level suffixes under which names are registered (a short list: the registries IoT clouds use most)
_TWO_LEVEL_SUFFIXES = frozenset({"co.uk", "com.au", "co.jp", "com.cn", "com.br", "co.kr", "co.nz", "com.tw",
                                 "net.cn", "org.uk", "ac.uk", "gov.uk", "com.hk", "com.sg"})


def registered_domain(name: str) -> str | None:
    """"vs-cam.u011.immedia-semi.com" -> "immedia-semi.com"; None for local, reverse and IP names."""
    name = name.lower().rstrip(".")
    if not name or "." not in name or name.endswith(".local") or name.endswith(_REVERSE) \
            or _IP_LITERAL.match(name):
        return None
    labels = name.split(".")
    if len(labels) >= 3 and ".".join(labels[-2:]) in _TWO_LEVEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])
