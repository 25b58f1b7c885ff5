"""The context of a flow: what its source, destination host, service and channel did recently, as
exponentially decayed counters over capture time (:class:`ContextTracker`, in the manner of Kitsune's
damped windows), and which MAC each local host sends from (:class:`LinkTracker`, for ARP and
neighbour-discovery spoofing). iotscan.detect.features turns them into the context part of a flow's row.

Memory is bounded: every table keeps at most ``max_keys`` keys, each key's set of recent peers at most
``SET_CAP`` entries, and keys idle for ``KEY_TTL_S`` seconds of capture time are dropped.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOWS_S: tuple[float, ...] = (5.0, 120.0)  # half-lives of the decayed context counters
NOVELTY_S = 300.0  # a peer unseen for this long counts as new again
KEY_TTL_S = 900.0  # tracker keys idle this long (capture time) are dropped
MAX_KEYS = 20_000  # per tracker table
SET_CAP = 48  # recent peers remembered per key
BEACON_ALPHA = 0.25  # weight of the newest interval in the beacon's running averages
_SWEEP_EVERY = 2048  # observations between expiry sweeps

_LN2 = math.log(2.0)
_exp = math.exp

# Raw accumulators per key and window, in the tracker's state order (see ContextTracker).
_SRC_ACC = ("w", "fail", "unans", "new_host", "new_port", "b", "bb")
_DST_ACC = ("w", "fail", "unans", "single", "new_src", "b", "bb")
_SVC_ACC = ("w", "fail", "single", "new_src", "b", "bb")
_CHAN_ACC = ("w", "fail", "b", "bb")
_N_BEACON_ACC = 4  # repeats, mean interval, mean |interval deviation|, mean |size deviation|
_N_CTX = len(WINDOWS_S) * (len(_SRC_ACC) + len(_DST_ACC) + len(_SVC_ACC) + len(_CHAN_ACC)) + _N_BEACON_ACC
_SRC_WIDTH = len(WINDOWS_S) * len(_SRC_ACC)  # where the destination's accumulators start in observe's list


class ContextTracker:
    """Decayed per-source, per-destination, per-service and per-channel counters over capture time.

    ``observe`` folds one flow in and returns the raw accumulators after it (the flow counts
    itself); :func:`context_features` turns a batch of them into features with numpy.

    A table's state per key is ``[last update, accumulators of window 1, of window 2, peer sets]``;
    a peer set maps a peer (a source, a host, a port) to when it was last seen, to count new ones.
    """

    def __init__(self, windows_s: Sequence[float] = WINDOWS_S, max_keys: int = MAX_KEYS,
                 set_cap: int = SET_CAP, key_ttl_s: float = KEY_TTL_S) -> None:
        if len(windows_s) != 2:
            raise ValueError("the tracker is written out for two windows")
        self.rates = [_LN2 / w for w in windows_s]
        self.max_keys = max_keys
        self.set_cap = set_cap
        self.key_ttl_s = key_ttl_s
        self.src: OrderedDict[str, list] = OrderedDict()
        self.dst: OrderedDict[str, list] = OrderedDict()
        self.svc: OrderedDict[tuple, list] = OrderedDict()
        self.chan: OrderedDict[tuple, list] = OrderedDict()
        self.now = 0.0
        self._seen = 0

    def tracked_keys(self) -> int:
        return len(self.src) + len(self.dst) + len(self.svc) + len(self.chan)

    def observe_batch(self, *columns: Sequence[Any], folded: Sequence[bool] | None = None) -> list[Any]:
        """``observe`` for a batch of flows in expiry order: one sequence per argument of ``observe``
        (see FeatureExtractor, which computes them from the meter's numbers with numpy).

        The flows ``folded`` marks (a flood's, folded into a flood record) give instead their source's and
        destination host's flows of the first window after them (what the flood rule reads): when the
        tracker does not know their source, they count in the destination's tables only (observe_target),
        and their source as a new one would, with one flow."""
        observe = self.observe
        if folded is None:
            return [observe(*args) for args in zip(*columns, strict=True)]
        out: list[Any] = []
        target, known = self.observe_target, self.src
        for fold, args in zip(folded, zip(*columns, strict=True), strict=True):
            if not fold:
                out.append(observe(*args))
            elif args[2] in known:
                row = observe(*args)
                out.append((row[0], row[_SRC_WIDTH]))
            else:
                out.append((1.0, target(args[0], *args[2:])[0]))
        return out

    def observe(self, t: float, t_first: float, src: str, dst: str, dport: int, proto: int, log_bytes: float,
                failed: float, unanswered: float, single: float) -> list[float]:
        """One flow: ``t`` its last packet, ``t_first`` its first (seconds of capture time), ``log_bytes``
        log1p of its size, ``failed``/``unanswered``/``single`` 1.0 or 0.0 (see _failed, one_way, 1 packet).

        Written out per table, with locals and slice assignments: this runs once per flow in Python
        and is most of the scorer's per-flow cost (a generic loop over the tables took 1.7 times as long).
        """
        self._count(t)
        out = self._source(t, src, dst, dport, log_bytes, failed, unanswered)
        out += self._target(t, src, dst, dport, proto, log_bytes, failed, unanswered, single)
        return self._channel(out, t, t_first, src, dst, dport, proto, log_bytes, failed)

    def observe_target(self, t: float, src: str, dst: str, dport: int, proto: int, log_bytes: float, failed: float,
                       unanswered: float, single: float) -> list[float]:
        """A flow only its destination's tables count, as ``observe`` counts it there: a flow of a flood from a
        source the tracker does not know, folded into a flood record (iotscan.detect.flood), whose source and
        channel would each be a key of one flow. Returns the destination host's and service's accumulators
        after it (the part of ``observe``'s list from the first destination one)."""
        self._count(t)
        return self._target(t, src, dst, dport, proto, log_bytes, failed, unanswered, single)

    def _count(self, t: float) -> None:
        if t > self.now:
            self.now = t
        self._seen += 1
        if self._seen % _SWEEP_EVERY == 0:
            self.sweep()

    def _source(self, t: float, src: str, dst: str, dport: int, lb: float, failed: float,
                unanswered: float) -> list[float]:
        """The source's table: flows, failures, unanswered, new destination hosts and ports (scans), size spread."""
        r1, r2 = self.rates
        cap = self.set_cap
        horizon = t - NOVELTY_S
        lb2 = lb * lb
        table = self.src
        st = table.get(src)
        if st is None:
            table[src] = [t, 1.0, failed, unanswered, 1.0, 1.0, lb, lb2, 1.0, failed, unanswered, 1.0, 1.0, lb, lb2,
                          {dst: t}, {dport: t}]
            return [1.0, failed, unanswered, 1.0, 1.0, lb, lb2, 1.0, failed, unanswered, 1.0, 1.0, lb, lb2]
        table.move_to_end(src)
        peers = st[15]
        new_host = 1.0 if peers.get(dst, -1e18) < horizon else 0.0
        peers[dst] = t
        if len(peers) > cap:
            del peers[next(iter(peers))]
        peers = st[16]
        new_port = 1.0 if peers.get(dport, -1e18) < horizon else 0.0
        peers[dport] = t
        if len(peers) > cap:
            del peers[next(iter(peers))]
        dt = t - st[0]
        if dt > 0.0:
            st[0] = t
            d1, d2 = _exp(-dt * r1), _exp(-dt * r2)
        else:
            d1 = d2 = 1.0
        a1, a2, a3, a4, a5, a6, a7, b1, b2, b3, b4, b5, b6, b7 = st[1:15]
        out = [a1 * d1 + 1.0, a2 * d1 + failed, a3 * d1 + unanswered, a4 * d1 + new_host, a5 * d1 + new_port,
               a6 * d1 + lb, a7 * d1 + lb2,
               b1 * d2 + 1.0, b2 * d2 + failed, b3 * d2 + unanswered, b4 * d2 + new_host, b5 * d2 + new_port,
               b6 * d2 + lb, b7 * d2 + lb2]
        st[1:15] = out
        return out

    def _target(self, t: float, src: str, dst: str, dport: int, proto: int, lb: float, failed: float,
                unanswered: float, single: float) -> list[float]:
        """The destination host's table (the victim's view: flows, failures, unanswered, single packets, new sources;
        a spoofed flood has one flow per source: only here does it add up), then the service's (destination host,
        port, protocol: many sources, failed or single-packet flows at one service)."""
        r1, r2 = self.rates
        cap = self.set_cap
        horizon = t - NOVELTY_S
        lb2 = lb * lb
        table = self.dst
        st = table.get(dst)
        if st is None:
            table[dst] = [t, 1.0, failed, unanswered, single, 1.0, lb, lb2, 1.0, failed, unanswered, single, 1.0, lb,
                          lb2, {src: t}]
            out = [1.0, failed, unanswered, single, 1.0, lb, lb2, 1.0, failed, unanswered, single, 1.0, lb, lb2]
        else:
            table.move_to_end(dst)
            peers = st[15]
            new_src = 1.0 if peers.get(src, -1e18) < horizon else 0.0
            peers[src] = t
            if len(peers) > cap:
                del peers[next(iter(peers))]
            dt = t - st[0]
            if dt > 0.0:
                st[0] = t
                d1, d2 = _exp(-dt * r1), _exp(-dt * r2)
            else:
                d1 = d2 = 1.0
            a1, a2, a3, a4, a5, a6, a7, b1, b2, b3, b4, b5, b6, b7 = st[1:15]
            out = [a1 * d1 + 1.0, a2 * d1 + failed, a3 * d1 + unanswered, a4 * d1 + single, a5 * d1 + new_src,
                   a6 * d1 + lb, a7 * d1 + lb2,
                   b1 * d2 + 1.0, b2 * d2 + failed, b3 * d2 + unanswered, b4 * d2 + single, b5 * d2 + new_src,
                   b6 * d2 + lb, b7 * d2 + lb2]
            st[1:15] = out

        table = self.svc
        key = (dst, dport, proto)
        st = table.get(key)
        if st is None:
            table[key] = [t, 1.0, failed, single, 1.0, lb, lb2, 1.0, failed, single, 1.0, lb, lb2, {src: t}]
            out += (1.0, failed, single, 1.0, lb, lb2, 1.0, failed, single, 1.0, lb, lb2)
            return out
        table.move_to_end(key)
        peers = st[13]
        new_src = 1.0 if peers.get(src, -1e18) < horizon else 0.0
        peers[src] = t
        if len(peers) > cap:
            del peers[next(iter(peers))]
        dt = t - st[0]
        if dt > 0.0:
            st[0] = t
            d1, d2 = _exp(-dt * r1), _exp(-dt * r2)
        else:
            d1 = d2 = 1.0
        a1, a2, a3, a4, a5, a6, b1, b2, b3, b4, b5, b6 = st[1:13]
        part = [a1 * d1 + 1.0, a2 * d1 + failed, a3 * d1 + single, a4 * d1 + new_src, a5 * d1 + lb, a6 * d1 + lb2,
                b1 * d2 + 1.0, b2 * d2 + failed, b3 * d2 + single, b4 * d2 + new_src, b5 * d2 + lb, b6 * d2 + lb2]
        st[1:13] = part
        out += part
        return out

    def _channel(self, out: list[float], t: float, t_first: float, src: str, dst: str, dport: int, proto: int,
                 lb: float, failed: float) -> list[float]:
        """``out`` with the channel's accumulators (source, service) added: repeated connections (password guessing),
        and the beacon: [t, 8 accumulators, prev_first, repeats, mean_interval, dev_interval, mean_size, dev_size]."""
        r1, r2 = self.rates
        lb2 = lb * lb
        table = self.chan
        key = (src, dst, dport, proto)
        st = table.get(key)
        if st is None:
            table[key] = [t, 1.0, failed, lb, lb2, 1.0, failed, lb, lb2, t_first, 0.0, 0.0, 0.0, lb, 0.0]
            out += (1.0, failed, lb, lb2, 1.0, failed, lb, lb2, 0.0, 0.0, 0.0, 0.0)
            return out
        table.move_to_end(key)
        dt = t - st[0]
        if dt > 0.0:
            st[0] = t
            d1, d2 = _exp(-dt * r1), _exp(-dt * r2)
        else:
            d1 = d2 = 1.0
        a1, a2, a3, a4, b1, b2, b3, b4, prev, repeats, mean_iv, dev_iv, mean_b, dev_b = st[1:15]
        part = [a1 * d1 + 1.0, a2 * d1 + failed, a3 * d1 + lb, a4 * d1 + lb2,
                b1 * d2 + 1.0, b2 * d2 + failed, b3 * d2 + lb, b4 * d2 + lb2]
        interval = t_first - prev
        if interval >= 0.0:  # out-of-order starts are not intervals
            a = BEACON_ALPHA
            if repeats == 0.0:  # the first interval seeds the average
                mean_iv = interval
            else:
                dev_iv += a * (abs(interval - mean_iv) - dev_iv)
                mean_iv += a * (interval - mean_iv)
            dev_b += a * (abs(lb - mean_b) - dev_b)
            mean_b += a * (lb - mean_b)
            prev = t_first
            repeats += 1.0
        st[1:15] = [*part, prev, repeats, mean_iv, dev_iv, mean_b, dev_b]
        out += part
        out += (repeats, mean_iv, dev_iv, dev_b)
        return out

    def sweep(self) -> None:
        """Drop keys idle for longer than the TTL, then the least recently active beyond the cap."""
        horizon = self.now - self.key_ttl_s
        for table in (self.src, self.dst, self.svc, self.chan):
            while table:
                first = next(iter(table))
                if table[first][0] < horizon or len(table) > self.max_keys:
                    del table[first]
                else:
                    break


def context_features(acc: np.ndarray) -> np.ndarray:
    """Raw tracker accumulators (n, _N_CTX) -> context feature columns, in FEATURE_NAMES order."""
    n_w = len(WINDOWS_S)
    cols: list[np.ndarray] = []
    pos = 0
    blocks = []
    for n_acc in (len(_SRC_ACC), len(_DST_ACC), len(_SVC_ACC), len(_CHAN_ACC)):
        # each table's accumulators: window 1's, then window 2's
        blocks.append(acc[:, pos:pos + n_acc * n_w].reshape(len(acc), n_w, n_acc))
        pos += n_acc * n_w
    src, dst, svc, chan = blocks
    beacon = acc[:, pos:pos + _N_BEACON_ACC]

    def std(s1: np.ndarray, s2: np.ndarray, w: np.ndarray) -> np.ndarray:
        mean = s1 / w
        return np.sqrt(np.maximum(s2 / w - mean * mean, 0.0))

    for k in range(n_w):
        w, fail, unans, nh, npo, b, bb = (src[:, k, m] for m in range(7))
        cols += [np.log1p(w), fail / w, unans / w, np.log1p(nh), nh / w, np.log1p(npo), npo / w, std(b, bb, w)]
    for k in range(n_w):
        w, fail, unans, single, ns, b, bb = (dst[:, k, m] for m in range(7))
        cols += [np.log1p(w), fail / w, unans / w, single / w, np.log1p(ns), ns / w, std(b, bb, w)]
    for k in range(n_w):
        w, fail, single, ns, b, bb = (svc[:, k, m] for m in range(6))
        cols += [np.log1p(w), fail / w, single / w, np.log1p(ns), ns / w, std(b, bb, w)]
    for k in range(n_w):
        w, fail, b, bb = (chan[:, k, m] for m in range(4))
        cols += [np.log1p(w), fail / w, std(b, bb, w)]
    repeats, mean_iv, dev_iv, dev_size = beacon.T
    cv = np.where(repeats >= 2, dev_iv / np.maximum(mean_iv, 1e-3), 1.0)
    regular = np.clip(1.0 - cv, 0.0, 1.0) * np.clip(1.0 - dev_size, 0.0, 1.0)
    # RITA-like: regular in time and size, repeated, and not a burst of parallel connections
    score = regular * np.clip(repeats / 10.0, 0.0, 1.0) * (mean_iv >= 1.0)
    cols += [np.log1p(repeats), np.log1p(mean_iv), np.minimum(cv, 10.0), dev_size, score]
    return np.column_stack(cols)


class LinkTracker:
    """The MAC each local host sends from, and the local host each MAC sends for, as flows show them
    (a flow's MACs are its first packet's); flags a flow sent to a local host through the MAC another
    host of its subnet sends from, while the host itself sends from another: the man in the middle of ARP
    spoofing, or of its IPv6 kin, neighbour-discovery spoofing (arpwatch's "changed ethernet address",
    read from flows). A router's MAC carries flows to remote hosts, which send from it too; a Wi-Fi
    extender that translates MACs carries its clients' flows both ways; a Thread border router carries its
    mesh's flows both ways. "Local" is a private IPv4 address (its subnet: the /24) or an IPv6 unique-local
    or link-local one (the /64); a global IPv6 address may be on the link or not, so it is none. Each table
    keeps at most MAX_KEYS entries, the first learned dropped first (a host re-learned on its next flow).
    """

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.own: OrderedDict[str, str] = OrderedDict()  # local IP -> the MAC it sends from
        self.sender: OrderedDict[str, str] = OrderedDict()  # MAC -> the local IP it sends for

    def observe_batch(self, srcs: Sequence[str], src_macs: Sequence[str], dsts: Sequence[str],
                      dst_macs: Sequence[str]) -> np.ndarray:
        """1.0 for the flows (in expiry order) sent to a local host through another local host's MAC."""
        own, sender, out = self.own, self.sender, np.zeros(len(srcs))
        for i, (src, src_mac, dst, dst_mac) in enumerate(zip(srcs, src_macs, dsts, dst_macs, strict=True)):
            if src_mac and own.get(src) != src_mac and _local_subnet(src) is not None:
                own[src] = src_mac
                sender[src_mac] = src
                for table in (own, sender):
                    if len(table) > self.max_keys:
                        del table[next(iter(table))]
            dst_own = own.get(dst)
            if dst_own is not None and dst_mac and dst_mac != dst_own:
                other = sender.get(dst_mac)
                if other is not None and other != dst and _local_subnet(other) == _local_subnet(dst):
                    out[i] = 1.0
        return out


_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


@functools.lru_cache(maxsize=65536)  # bounded: a spoofed flood has a new address per flow
def _local_subnet(ip: str) -> str | None:
    """The subnet of a local address (see LinkTracker), as text; None for any other address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 4:
        return ip.rpartition(".")[0] if address.is_private else None
    if address.is_link_local or address in _UNIQUE_LOCAL:
        return address.exploded[:19]  # the first four groups
    return None
