"""The request pass's signatures: what each reads, its family and reasons, loaded from the data file
iotscan/data/request_signatures.json (iotscan.detect.request_pass reads the packets; a signature's number is
its position there plus one, stored in the model's feature rows)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# What each kind of signature reads ("where" in the signatures file), and what a person reads first
# about a flow that matched one of that kind
_REASONS = {
    "target": "HTTP request matched {kind} signature: {name}",  # the request target
    "head": "HTTP request matched {kind} signature: {name}",  # the request line and headers
    "body": "HTTP request matched {kind} signature: {name}",  # what follows the headers in the request's segment
    "dns": "DNS queries matched a tunnel signature: {name}",  # a query: "example.com a"
    "tcp-flags": "TCP flags no connection uses: {name}",  # a segment's flags without SYN, ACK and RST: "fpu"
    "syn": "a scanning tool's probe: {name}",  # a SYN's header (see SYN_FILTER): "window 1024 df 0"
    "echo": "a scanning tool's probe: {name}",  # an echo request (see ECHO_FILTER): "echo-request data 0"
    "line": "a bot's command to its controller: {name}",  # a segment starting with BOT_LINE_STARTS
    "checkin": "a bot's check-in with its controller: {name}",  # a BOT_CHECKIN segment, as hex: "00000001"
    "ssh": "{name}",  # an SSH identification line: "ssh-2.0-openssh_9.6"
    "file": "{name}",  # a segment starting with "#!", "mz" or an ELF header (FILE_STARTS, ELF_START), lower-cased
    "shell": "{name}",  # a segment starting with a shell's banner or an id command's output (SHELL_STARTS)
    "reply": "{name}",  # a server's segment: an MQTT CONNACK ("mqtt connack 5"), a telnet server's text
    "ftp-reply": "{name}",  # an FTP server's reply (from port 21), lower-cased
    "held": "{name}",  # a request head held open (see HEAD_HELD_MS): "request head held open"
}
# What each family's tools are called in the reasons of HTTP signatures
_TOOL = {"scan": "a scanner", "bruteforce": "a password guesser"}


@dataclass(frozen=True)
class RequestSignature:
    name: str
    family: str
    where: str  # what it reads: see _REASONS
    needs: tuple[str, ...]  # the pattern is tried only when the text holds one of these (none: always)
    pattern: re.Pattern[str]  # lower case, searched in lower-cased text
    min_count: int = 1  # packets of one flow that must match: one odd DNS name is no tunnel
    # matching flows between the same two hosts that must come within pair_window_ms: one refused login
    # is a typo, five within minutes are guesses
    min_pair_count: int = 1
    pair_window_ms: int = 0
    source: str = ""  # where it comes from (a rule set, a CVE's proof of concept, a bot's source code)
    by_address_only: bool = False  # counts only in a flow whose HTTP request named no server (see the data file)

    @property
    def marks_pair(self) -> bool:
        """Whether a match marks the two hosts' other flows: not a DNS one, whose hosts are a client and
        its resolver, which carries every name the client looks up."""
        return self.where != "dns"

    @property
    def reason(self) -> str:
        """What a person reads first about a flow that matched."""
        reason = _REASONS[self.where].format(kind=_TOOL.get(self.family, "an exploit"), name=self.name)
        if self.min_pair_count > 1:
            reason += f", {self.min_pair_count} or more between the same two hosts within " \
                      f"{self.pair_window_ms // 60_000} minutes"
        return reason

    @property
    def pair_reason(self) -> str:
        """What a person reads first about another flow of two hosts one of whose flows matched."""
        return f"a flow between the same two hosts matched a signature within minutes: {self.name}"

    @property
    def names_hosts(self) -> bool:
        """Whether the hosts a matching request names are marked: an exploit's, whose victim calls them."""
        return self.family == "exploit" and self.where in ("target", "head", "body")

    @property
    def named_reason(self) -> str:
        """What a person reads first about a flow between an exploited host and a host the exploit named."""
        return f"the other host was named in an exploit request this host received within minutes: {self.name}"


def _signatures_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "request_signatures.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data" / "request_signatures.json"


def _load() -> list[RequestSignature]:
    data = json.loads(_signatures_path().read_text())
    signatures = [RequestSignature(s["name"], s["family"], s["where"], tuple(s["needs"]), re.compile(s["pattern"]),
                                   s.get("min_count", 1), s.get("min_pair_count", 1), s.get("pair_window_s", 0) * 1000,
                                   s.get("source", ""), s.get("by_address_only", False))
                  for s in data["signatures"]]
    unknown = {s.where for s in signatures} - _REASONS.keys()
    if unknown:
        raise ValueError(f"request signatures: unknown 'where' {sorted(unknown)}")
    return signatures


# Loaded at import, so the meter process (a fork) has them compiled; a broken file is a broken install.
SIGNATURES: list[RequestSignature] = _load()
def signature(code: int) -> RequestSignature | None:
    """The signature a flow's request code stands for (0: none)."""
    return SIGNATURES[code - 1] if 0 < code <= len(SIGNATURES) else None


