"""MUD (RFC 8520): a device's learnt peers and ports as a Manufacturer Usage Description, and MUD files as baselines.

``export_mud`` writes one MUD file per profile: the ``ietf-mud:mud`` container and the ACLs (RFC 8519, with
the DNS-name matches of ``ietf-acldns``) it names, a from-device and a to-device ACL per address family. Each
remote peer and service the device used becomes an ACE: by DNS name where the profile has one
(``dst-dnsname``/``src-dnsname``), else by address (``/32``, ``/128``); local peers become ``local-networks``
ACEs. A connection the device started is allowed out (``direction-initiated: from-device`` for TCP) and its
answers in; one it served, the other way round.

``MudPolicy`` reads a MUD file (the vendor's, or one exported here) and says whether it allows a flow: the
first ACE of the ACL for the flow's direction that matches its peer, protocol and port decides (accept, or
drop/reject); no match is no permission, and the flow is an anomaly naming the ACL. Matches on
``controller``, ``my-controller``, ``same-manufacturer`` and ``model`` cannot be resolved from traffic alone
and are taken as local networks.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

import orjson

from iotscan.detect.profiles import (
    DYNAMIC_PORTS,
    BadBaseline,
    Side,
    check_baseline,
    clean_name,
    days_text,
    is_mac,
    parse_time,
    read_json,
)
from iotscan.errors import InputError
from iotscan.output.records import PROTOCOL_LABELS, iso_timestamp

MUD_KEY = "ietf-mud:mud"
ACLS_KEY = "ietf-access-control-list:acls"
MAX_ACES = 512  # per ACL
DYNAMIC = -1  # the port of a service key "tcp/dynamic": a range
_PROTOCOLS = {label: number for number, label in PROTOCOL_LABELS.items()}
_MAC_IN_NAME = re.compile(r"([0-9a-f]{2}[-:_]){5}[0-9a-f]{2}", re.IGNORECASE)


def parse_service(service: str) -> tuple[int, int | None]:
    """"tcp/443" -> (6, 443); "icmp" -> (1, None); "proto/47" -> (47, None)."""
    label, _, port = service.partition("/")
    if label == "proto":
        return int(port), None
    if port == "dynamic":
        return _PROTOCOLS.get(label, 0), DYNAMIC
    return _PROTOCOLS.get(label, 0), int(port) if port else None


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


# -- export ---------------------------------------------------------------------------------------------------


def mud_file_name(mac: str) -> str:
    return f"{mac.replace(':', '-')}.mud.json"


def export_mud(mac: str, profile: dict[str, Any], url_base: str, updated_ms: int) -> dict[str, Any]:
    """The MUD file of one device profile (a baseline's ``devices[mac]``)."""
    identity = profile.get("identity") or {}
    name = mac.replace(":", "")
    acls: dict[tuple[str, int], list[dict[str, Any]]] = {(d, f): [] for d in ("from", "to") for f in (4, 6)}
    for peer, p in profile["remote"].items():
        named = p.get("by", "name") == "name" and clean_name(peer) is not None
        family = 4 if named else _family(peer)
        for out, services in ((True, p["out"]), (False, p["in"])):
            for service in services:
                _aces(acls, family, out, service, {"name": peer} if named else {"address": peer})
    for p in profile["local"].values():
        for out, services in ((True, p["out"]), (False, p["in"])):
            for service in services:
                _aces(acls, 4, out, service, {"local": True})
    policies: dict[str, dict[str, Any]] = {"from": {"access-list": []}, "to": {"access-list": []}}
    acl_list = []
    for (direction, family), aces in acls.items():
        if not aces:
            continue
        acl_name = f"{direction}-ipv{family}-{name}"
        unique = list({orjson.dumps(a, option=orjson.OPT_SORT_KEYS): a for a in aces}.values())[:MAX_ACES]
        for i, ace in enumerate(unique):
            ace["name"] = f"{'frdev' if direction == 'from' else 'todev'}{family}-{i}"
        acl_list.append({"name": acl_name, "type": f"ipv{family}-acl-type",
                         "aces": {"ace": [{"name": a.pop("name"), **a} for a in unique]}})
        policies[direction]["access-list"].append({"name": acl_name})
    days = (parse_time(profile["last_seen"]) - parse_time(profile["first_seen"])) / 86_400_000
    what = " ".join(str(x) for x in (identity.get("vendor"), identity.get("model") or identity.get("device_type"))
                    if x and x != "unknown") or "device"
    mud: dict[str, Any] = {
        "mud-version": 1,
        "mud-url": f"{url_base.rstrip('/')}/{mud_file_name(mac)}",
        "last-update": iso_timestamp(updated_ms).replace("Z", "+00:00"),
        "cache-validity": 48,
        "is-supported": True,
        "systeminfo": f"{what} {mac}, learnt by iotscan from {days_text(days)} of its traffic"[:255],
    }
    if identity.get("vendor"):
        mud["mfg-name"] = str(identity["vendor"])
    if identity.get("model"):
        mud["model-name"] = str(identity["model"])
    mud["from-device-policy"] = {"access-lists": policies["from"]}
    mud["to-device-policy"] = {"access-lists": policies["to"]}
    return {MUD_KEY: mud, ACLS_KEY: {"acl": acl_list}}


def _aces(acls: dict[tuple[str, int], list[dict[str, Any]]], family: int, out: bool, service: str,
          peer: dict[str, Any]) -> None:
    """The two ACEs of one service with one peer: the way the connection is started, and its answers."""
    protocol, port = parse_service(service)
    if protocol == 58:
        family = 6
    # started by the device: out to the peer's port, answers in from it; served by it: the other way round
    acls[("from", family)].append(_ace(family, protocol, port, peer, toward_peer=True, port_is_peer=out, out=out))
    acls[("to", family)].append(_ace(family, protocol, port, peer, toward_peer=False, port_is_peer=out, out=out))


def _ace(family: int, protocol: int, port: int | None, peer: dict[str, Any], *, toward_peer: bool,
         port_is_peer: bool, out: bool) -> dict[str, Any]:
    ip_key = f"ipv{family}"
    matches: dict[str, Any] = {ip_key: {"protocol": protocol}}
    if "name" in peer:
        matches[ip_key][f"ietf-acldns:{'dst' if toward_peer else 'src'}-dnsname"] = peer["name"]
    elif "address" in peer:
        bits = 32 if family == 4 else 128
        where = "destination" if toward_peer else "source"
        matches[ip_key][f"{where}-ipv{family}-network"] = f"{peer['address']}/{bits}"
    else:
        matches["ietf-mud:mud"] = {"local-networks": [None]}
    if port is not None and protocol in (6, 17):
        # the port is the peer's (its destination, when the packet goes to it) or the device's own
        which = "destination-port" if port_is_peer == toward_peer else "source-port"
        spec = {"lower-port": DYNAMIC_PORTS, "upper-port": 65535} if port == DYNAMIC else \
            {"operator": "eq", "port": port}
        transport: dict[str, Any] = {which: spec}
        if protocol == 6:
            transport["ietf-mud:direction-initiated"] = "from-device" if out else "to-device"
        matches["tcp" if protocol == 6 else "udp"] = transport
    return {"name": "", "matches": matches, "actions": {"forwarding": "accept"}}


# -- a MUD file as a baseline -----------------------------------------------------------------------------------


class MudPolicy:
    """What one MUD file allows a device."""

    def __init__(self, path: str, doc: Any) -> None:
        self.path = path
        if not isinstance(doc, dict) or not isinstance(doc.get(MUD_KEY), dict):
            raise BadBaseline(f"{path}: not a MUD file (no \"{MUD_KEY}\" object)")
        mud = doc[MUD_KEY]
        acls = doc.get(ACLS_KEY, {})
        if not isinstance(acls, dict) or not isinstance(acls.get("acl", []), list):
            raise BadBaseline(f"{path}: {ACLS_KEY}.acl must be a list of ACLs")
        by_name = {}
        for i, acl in enumerate(acls.get("acl", [])):
            if not isinstance(acl, dict) or not isinstance(acl.get("name"), str):
                raise BadBaseline(f"{path}: {ACLS_KEY}.acl[{i}] must be an object with a name")
            aces = (acl.get("aces") or {}).get("ace", [])
            if not isinstance(aces, list) or not all(isinstance(a, dict) for a in aces):
                raise BadBaseline(f"{path}: ACL {acl['name']}: aces.ace must be a list of ACEs")
            by_name[acl["name"]] = aces
        self.acls: dict[bool, list[tuple[str, list[dict[str, Any]]]]] = {}
        for out, key in ((True, "from-device-policy"), (False, "to-device-policy")):
            names = [a.get("name") for a in ((mud.get(key) or {}).get("access-lists") or {}).get("access-list", [])
                     if isinstance(a, dict)]
            missing = [n for n in names if n not in by_name]
            if missing:
                raise BadBaseline(f"{path}: {key} names ACL {missing[0]!r}, which the file does not define")
            self.acls[out] = [(n, by_name[n]) for n in names]
        self.url = mud.get("mud-url")

    def allows(self, side: Side, r: dict[str, Any]) -> tuple[bool, str]:
        """(allowed, why not): the first matching ACE of the direction's ACLs decides."""
        names = [n for n, _ in self.acls[side.out]]
        for name, aces in self.acls[side.out]:
            for ace in aces:
                if _matches(ace.get("matches") or {}, side, r):
                    action = (ace.get("actions") or {}).get("forwarding", "accept")
                    if action == "accept":
                        return True, ""
                    return False, f"MUD ACL {name} ACE {ace.get('name')} {action}s it ({os.path.basename(self.path)})"
        where = f"to {side.peer}" if side.out else f"from {side.peer}"
        acl_text = f"ACL {', '.join(names)}" if names else "no ACL for this direction"
        return False, f"not allowed by its MUD file ({os.path.basename(self.path)}, {acl_text}): no ACE accepts " \
                      f"{side.service} {where}"


def _port_ok(spec: Any, port: int) -> bool:
    if not isinstance(spec, dict):
        return True
    op = spec.get("operator", "eq")
    if "lower-port" in spec:
        return int(spec["lower-port"]) <= port <= int(spec.get("upper-port", spec["lower-port"]))
    value = int(spec.get("port", port))
    return {"eq": port == value, "neq": port != value, "lte": port <= value, "gte": port >= value}.get(op, False)


def _matches(m: dict[str, Any], side: Side, r: dict[str, Any]) -> bool:
    out = side.out
    protocol = r["protocol"]
    peer_is_local = not side.remote
    mud = m.get("ietf-mud:mud")
    if isinstance(mud, dict) and mud and not peer_is_local:
        return False  # local-networks, controller, same-manufacturer...: only local peers
    for family in ("ipv4", "ipv6"):
        ip = m.get(family)
        if not isinstance(ip, dict):
            continue
        if (family == "ipv6") != (":" in side.peer_ip):
            return False
        if "protocol" in ip and ip["protocol"] != protocol:
            return False
        name = ip.get("ietf-acldns:dst-dnsname" if out else "ietf-acldns:src-dnsname")
        if name is not None and (not side.named or side.peer != str(name).lower().rstrip(".")):
            return False
        network = ip.get(f"destination-{family}-network" if out else f"source-{family}-network")
        if network is not None:
            try:
                if ipaddress.ip_address(side.peer_ip) not in ipaddress.ip_network(network, strict=False):
                    return False
            except ValueError:
                return False
    for transport, number in (("tcp", 6), ("udp", 17)):
        t = m.get(transport)
        if not isinstance(t, dict):
            continue
        if protocol != number:
            return False
        # the packet that starts the flow goes from the device (out) or to it (in): its destination port is the
        # responder's, its source port the initiator's
        if not _port_ok(t.get("destination-port"), r["dst_port"]) or not _port_ok(t.get("source-port"), r["src_port"]):
            return False
        initiated = t.get("ietf-mud:direction-initiated")
        if initiated is not None and initiated != ("from-device" if out else "to-device"):
            return False
    return True


def _mud_mac(spec: str, path: str) -> str:
    mac, sep, _ = spec.partition("=")
    if sep:
        mac = mac.lower()
        if not is_mac(mac):
            raise InputError(f"{spec}: give a MUD file as MAC=FILE, with the device's MAC (aa:bb:cc:dd:ee:ff)")
        return mac
    found = _MAC_IN_NAME.search(os.path.basename(path))
    if found is None:
        raise InputError(f"{path}: which device does this MUD file describe? give it as --baseline MAC=FILE")
    return re.sub(r"[-_]", ":", found.group(0)).lower()


def load_baselines(specs: list[str] | tuple[str, ...] | Any) -> tuple[dict[str, Any], dict[str, MudPolicy]]:
    """--baseline values: at most one baseline file, and MUD files (MAC=FILE, or named by a MAC)."""
    from iotscan.detect.profiles import new_baseline

    baseline: dict[str, Any] | None = None
    policies: dict[str, MudPolicy] = {}
    for spec in specs:
        spec = str(spec)
        mac_part, sep, rest = spec.partition("=")
        path = rest if sep and is_mac(mac_part.lower()) else spec
        doc = read_json(path)
        if isinstance(doc, dict) and MUD_KEY in doc:
            policies[_mud_mac(spec, path)] = MudPolicy(path, doc)
            continue
        if baseline is not None:
            raise InputError(f"{path}: give one baseline file (and any number of MUD files)")
        baseline = check_baseline(path, doc)
    return baseline or new_baseline(), policies
