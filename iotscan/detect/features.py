"""The one feature code path of the flow classifier, shared by training and scoring.

A flow's feature row has two parts:

* per-flow: NFStream's statistics of the flow itself (sizes, timing, TCP flags, direction
  balance, early-packet sizes and directions), its nDPI application and category as codes of a
  fixed vocabulary stored with the model, and the class of its ports (well-known, registered,
  ephemeral) -- never an address, a MAC, a raw port or an absolute time. Packet sizes are
  counted as at least 60 bytes (the Ethernet minimum frame): a capture taken at the sender sees
  a 54-byte SYN, one taken at the receiver the same SYN padded to 60, and the model must not
  learn which side of the wire a capture came from; and the signature its HTTP requests (an
  exploit), DNS queries (a tunnel) or TCP flags (a scan probe) matched, read by the request pass
  (iotscan/detect/request_pass.py) beside the main one, and the signature a flow between the same two
  hosts matched within minutes of it;
* context: what the flow's source, its destination host (the victim's view), its service
  (destination host, port, protocol) and its channel (source, service) did recently, kept by
  :class:`iotscan.detect.context.ContextTracker` as exponentially decayed counters over capture time (in the manner of
  Kitsune's damped windows): flow rate, distinct sources, destination hosts and ports, shares of
  failed, unanswered and single-packet flows, spread of flow sizes, and the regularity of
  intervals and sizes of repeated flows on one channel (a beacon score, as RITA computes it).
  A spoofed flood has one flow per source, so only the victim's view sees it; a scan shows in its
  source's distinct ports and hosts; password guessing in many short connections of one size on
  one channel; a bot's beacon in regular intervals on one channel.

Context is causal: a flow sees the flows that expired before it in the same capture (flows reach
the tracker in expiry order, which follows their last packet). What the features read of a flow
comes from the meter as one bytes block of NFStream's C numbers (iotscan.capture.flows.flow_block_dtype),
so a batch of rows becomes one numpy array without a Python number per statistic; per flow, Python
does only the tracker's few dictionary updates, and every derived value is computed with numpy on
a batch of rows (:meth:`FeatureExtractor.take`).

Memory is bounded: every tracker table keeps at most ``max_keys`` keys, each key's set of recent
peers at most ``SET_CAP`` entries, and keys idle for ``KEY_TTL_S`` seconds of capture time are
dropped.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from iotscan.capture.flows import flow_block_dtype
from iotscan.detect.context import (
    WINDOWS_S,
    ContextTracker,
    LinkTracker,
    context_features,
)
from iotscan.output.records import MeteredFlow, flow_attributes

if TYPE_CHECKING:
    from iotscan.detect.request_findings import RequestFindings

# Bump whenever a feature's meaning, order or the meter settings below change: models record it and
# refuse to load under another version (exit 4) instead of scoring garbage.
FEATURE_SCHEMA_VERSION = 7  # 6: request signatures 14-22, named_signature; 7: intercepted

# Meter settings the features rely on (recorded in models); training extraction and `analyze` both meter
# with them, and have the meter send each flow as metered_flow_with_statistics makes it.
SPLT_PACKETS = 6  # early packets whose sizes and directions are kept
METER_SETTINGS: dict[str, Any] = {"statistics": True, "splt": SPLT_PACKETS}

MIN_FRAME = 60.0  # Ethernet minimum frame without FCS: smaller packets are padded on the wire


# -- per-flow attributes read from NFStream -------------------------------------------------------

_RAW_NUMERIC = (
    "protocol", "ip_version", "src_port", "dst_port",
    "bidirectional_duration_ms", "bidirectional_packets", "bidirectional_bytes",
    "src2dst_packets", "src2dst_bytes", "dst2src_packets", "dst2src_bytes",
    "src2dst_duration_ms", "dst2src_duration_ms", "src2dst_first_seen_ms", "dst2src_first_seen_ms",
    "bidirectional_min_ps", "bidirectional_mean_ps", "bidirectional_stddev_ps", "bidirectional_max_ps",
    "src2dst_min_ps", "src2dst_mean_ps", "src2dst_stddev_ps", "src2dst_max_ps",
    "dst2src_min_ps", "dst2src_mean_ps", "dst2src_stddev_ps", "dst2src_max_ps",
    "bidirectional_min_piat_ms", "bidirectional_mean_piat_ms", "bidirectional_stddev_piat_ms",
    "bidirectional_max_piat_ms",
    "src2dst_mean_piat_ms", "src2dst_stddev_piat_ms", "dst2src_mean_piat_ms", "dst2src_stddev_piat_ms",
    "src2dst_syn_packets", "src2dst_cwr_packets", "src2dst_ece_packets", "src2dst_urg_packets",
    "src2dst_ack_packets", "src2dst_psh_packets", "src2dst_rst_packets", "src2dst_fin_packets",
    "dst2src_syn_packets", "dst2src_cwr_packets", "dst2src_ece_packets", "dst2src_urg_packets",
    "dst2src_ack_packets", "dst2src_psh_packets", "dst2src_rst_packets", "dst2src_fin_packets",
    "application_is_guessed",
    # read for the tracker, not numeric features themselves:
    "bidirectional_first_seen_ms", "bidirectional_last_seen_ms",
)
_N_NUM = len(_RAW_NUMERIC) - 2
_R = {name: i for i, name in enumerate(_RAW_NUMERIC)}
_get_raw = attrgetter(*_RAW_NUMERIC)
# What a held flow (records.HeldFlow: a packet alone, without statistics) gives of these; the rest is 0, as for any
# one-packet flow but its flags, which only its failure reads (and one packet without an answer has failed).
_HELD_RAW = ("protocol", "ip_version", "src_port", "dst_port", "bidirectional_packets", "bidirectional_bytes",
             "src2dst_packets", "src2dst_bytes", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms")
_get_held_raw = attrgetter(*_HELD_RAW)
_HELD_COLUMNS = [_R[name] for name in _HELD_RAW]
# A whole flow's statistics packed: the numbers above, then the early packets' directions and sizes (float64).
_STATS = struct.Struct(f"<{len(_RAW_NUMERIC) + 2 * SPLT_PACKETS}d")
_NO_SPLT = (-1,) * SPLT_PACKETS + (0,) * SPLT_PACKETS
# What is read of the flow itself besides its statistics: addresses and names for the tracker and the
# codes, and nDPI's guess flag, which the meter's block does not hold.
_get_names = attrgetter("src_ip", "dst_ip", "application_name", "application_category_name",
                        "application_is_guessed", "src_mac", "dst_mac")
# Standard deviations, which the meter's block holds as sums of squared deviations (see flow_block_dtype):
# name -> (the packet count of its direction, how many fewer values there are than packets).
_SUMS_OF_SQUARES = {f"{d}_stddev_{kind}": (f"{d}_packets", lost) for d in ("bidirectional", "src2dst", "dst2src")
                    for kind, lost in (("ps", 1), ("piat_ms", 2))}
_FLAGS = ("syn", "cwr", "ece", "urg", "ack", "psh", "rst", "fin")

# -- the feature list (pinned: order is the model's column order) ---------------------------------

_PER_FLOW = [
    "proto_tcp", "proto_udp", "proto_icmp", "ip_v6",
    "dst_port_class", "src_port_class", "src_port_below_dst", "dst_multicast",
    "log_duration_ms", "log_packets", "log_bytes",
    "log_src2dst_packets", "log_src2dst_bytes", "log_dst2src_packets", "log_dst2src_bytes", "log_packet_rate",
    "dst2src_byte_share", "dst2src_packet_share", "one_way", "failed",
    "log_response_delay_ms", "log_src2dst_duration_ms", "log_dst2src_duration_ms",
    "min_ps", "mean_ps", "stddev_ps", "max_ps",
    "src2dst_min_ps", "src2dst_mean_ps", "src2dst_stddev_ps", "src2dst_max_ps",
    "dst2src_min_ps", "dst2src_mean_ps", "dst2src_stddev_ps", "dst2src_max_ps",
    "log_min_piat_ms", "log_mean_piat_ms", "log_stddev_piat_ms", "log_max_piat_ms",
    "log_src2dst_mean_piat_ms", "log_src2dst_stddev_piat_ms",
    "log_dst2src_mean_piat_ms", "log_dst2src_stddev_piat_ms",
    *[f"src2dst_{f}_share" for f in _FLAGS],
    *[f"dst2src_{f}_share" for f in _FLAGS],
    "log_src2dst_syn", "log_src2dst_rst", "log_dst2src_syn", "log_dst2src_rst",
    "app_guessed",
    *[f"early{i}_size" for i in range(SPLT_PACKETS)],  # signed: + from initiator, - from responder, 0 none
    "early_direction_changes",
]
CATEGORICAL = ["app_code", "category_code"]
# The code of the signature the flow's requests, queries or TCP flags matched (0: none or not read): a match
# makes the flow an attack whatever the detector says (see iotscan.detect.scoring.attack_scores).
REQUEST_SIGNATURE = "request_signature"
# The code of a signature that a flow between the same two hosts (this one or another) matched while this one
# was active or shortly before or after (see request_findings.PAIR_AFTER_MATCH_MS): marks an exploit's callbacks
# and downloads, a scanner's other probes. Decides as the flow's own match does, after it.
PAIR_SIGNATURE = "pair_signature"
# The code of an exploit's signature whose request, received by one of the flow's hosts, named the other (a
# download, a callback: see request_pass.MAX_NAMED_HOSTS) around the flow's time. Decides after the pair's.
NAMED_SIGNATURE = "named_signature"
SIGNATURE_FEATURES = [REQUEST_SIGNATURE, PAIR_SIGNATURE, NAMED_SIGNATURE]
# 1 when the flow went to a local host through the MAC another local host sends from, while the host itself
# sends from its own (see LinkTracker): ARP spoofing's man in the middle. Decides as a signature does.
INTERCEPTED = "intercepted"


def _windowed(prefix: str, stats: Sequence[str]) -> list[str]:
    return [f"{prefix}_{s}_{int(w)}s" for w in WINDOWS_S for s in stats]


# Context features per table and window (see context_features for their arithmetic).
_SRC_STATS = ("log_flows", "fail_share", "unanswered_share", "log_new_hosts", "new_host_share", "log_new_ports",
              "new_port_share", "bytes_std")
_DST_STATS = ("log_flows", "fail_share", "unanswered_share", "single_share", "log_new_srcs", "new_src_share",
              "bytes_std")
_SVC_STATS = ("log_flows", "fail_share", "single_share", "log_new_srcs", "new_src_share", "bytes_std")
_CHAN_STATS = ("log_flows", "fail_share", "bytes_std")
_BEACON = ["chan_log_repeats", "chan_log_mean_interval_s", "chan_interval_cv", "chan_size_dev", "beacon_score"]

FEATURE_NAMES: list[str] = [
    *_PER_FLOW, *CATEGORICAL, *SIGNATURE_FEATURES, INTERCEPTED,
    *_windowed("src", _SRC_STATS), *_windowed("dst", _DST_STATS), *_windowed("svc", _SVC_STATS),
    *_windowed("chan", _CHAN_STATS), *_BEACON,
]
# columns, by name: the signature codes, the link check and the first context feature
_SIGNATURE_COLUMNS = slice(FEATURE_NAMES.index(SIGNATURE_FEATURES[0]), FEATURE_NAMES.index(SIGNATURE_FEATURES[-1]) + 1)
_INTERCEPTED_COLUMN = FEATURE_NAMES.index(INTERCEPTED)
_FIRST_CONTEXT = _INTERCEPTED_COLUMN + 1
CONTEXT_FEATURES: frozenset[str] = frozenset(FEATURE_NAMES[_FIRST_CONTEXT:])
# What the per-flow baseline (a random forest on NFStream statistics alone) may use.
STATISTICS_FEATURES: list[str] = [n for n in _PER_FLOW if not n.startswith("early")
                                  and n not in ("early_direction_changes", "app_guessed", "log_packet_rate")]
# What the attack detector sees: every feature but the nDPI application fields and the beacon features
# (and the signatures, which decide by themselves).
# Measured leave one source out (see training/flows-card-notes.md), both let the detector learn which
# network a flow came from -- each source has its own applications, and benign IoT heartbeats look like
# beacons -- and leaving them out raised recall per attack capture at 1% benign false positives from
# 0.14 to 0.39. They are still computed: the family model (which names an attack already detected) uses them.
DETECTOR_FEATURES: list[str] = [n for n in FEATURE_NAMES
                                 if n not in (*CATEGORICAL, "app_guessed", *SIGNATURE_FEATURES, INTERCEPTED, *_BEACON)]
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
_MATCHED_PROTOCOLS = frozenset((1, 6, 17, 58))  # ICMP, TCP, UDP, ICMPv6: what the request pass matches


# -- stable encoding of nDPI applications and categories ------------------------------------------

def master_app(name: str | None) -> str:
    """nDPI's master protocol ("TLS" of "TLS.Google"): the part that generalises across networks."""
    if not name:
        return "Unknown"
    return name.split(".", 1)[0]


def build_vocabulary(apps: Sequence[str], categories: Sequence[str], groups: Sequence[Any],
                     min_groups: int = 2, max_size: int = 200) -> dict[str, list[str]]:
    """The fixed vocabulary stored with a model: names seen in at least ``min_groups`` captures.

    A name seen in one capture only would let the model learn that capture; it becomes "other".
    """
    vocab: dict[str, list[str]] = {}
    for key, names in (("app", apps), ("category", categories)):
        seen: dict[str, set] = {}
        for name, group in zip(names, groups, strict=True):
            seen.setdefault(name, set()).add(group)
        kept = sorted((n for n, g in seen.items() if len(g) >= min_groups), key=lambda n: (-len(seen[n]), n))
        vocab[key] = sorted(kept[:max_size])
    return vocab


def encode_names(names: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Codes 1..n for names in the vocabulary, 0 for "other"."""
    index = {name: i + 1 for i, name in enumerate(vocabulary)}
    return np.fromiter((index.get(n, 0) for n in names), dtype=np.float32, count=len(names))


# -- rows -----------------------------------------------------------------------------------------

def _port_class(port: np.ndarray) -> np.ndarray:
    return np.select([port == 0, port < 1024, port < 49152], [0.0, 1.0, 2.0], 3.0)


# Memoized with a bound: a spoofed flood has a new address per flow.
@functools.lru_cache(maxsize=65536)
def _is_multicast(ip: str) -> bool:
    if ":" in ip:
        return ip[:2].lower() == "ff"
    head = ip.split(".", 1)[0]
    return (head.isdigit() and 224 <= int(head) <= 239) or ip.endswith(".255")


def _framed(size: np.ndarray) -> np.ndarray:
    """Packet sizes as at least MIN_FRAME bytes (0 stays 0: no packet)."""
    return np.where(size > 0, np.maximum(size, MIN_FRAME), 0.0)


def per_flow_features(raw: np.ndarray, multicast: np.ndarray, splt_dirs: np.ndarray,
                      splt_sizes: np.ndarray) -> np.ndarray:
    """Raw NFStream numbers (n, _N_NUM) -> per-flow feature columns, in FEATURE_NAMES order."""
    def c(name: str) -> np.ndarray:
        return raw[:, _R[name]]

    proto = c("protocol")
    packets = c("bidirectional_packets")
    s_pk, d_pk = c("src2dst_packets"), c("dst2src_packets")
    # bytes as if every packet were at least a minimum frame (padding is a property of the capture point)
    s_b = np.maximum(c("src2dst_bytes"), MIN_FRAME * s_pk)
    d_b = np.maximum(c("dst2src_bytes"), MIN_FRAME * d_pk)
    nbytes = s_b + d_b
    sport, dport = c("src_port"), c("dst_port")
    one_way = (d_pk == 0).astype(np.float64)
    is_tcp = proto == 6
    failed = _failed(raw)
    duration = c("bidirectional_duration_ms")
    delay = np.where(d_pk > 0, np.maximum(c("dst2src_first_seen_ms") - c("src2dst_first_seen_ms"), 0.0), -1.0)
    safe_s, safe_d = np.maximum(s_pk, 1.0), np.maximum(d_pk, 1.0)
    cols = [
        is_tcp, proto == 17, (proto == 1) | (proto == 58), c("ip_version") == 6,
        _port_class(dport), _port_class(sport), (sport < dport) & (sport > 0), multicast,
        np.log1p(duration), np.log1p(packets), np.log1p(nbytes),
        np.log1p(s_pk), np.log1p(s_b), np.log1p(d_pk), np.log1p(d_b),
        np.log1p(np.maximum(packets - 1.0, 0.0) / (duration / 1000.0 + 1.0)),  # packets per second after the first
        d_b / np.maximum(nbytes, 1.0), d_pk / np.maximum(packets, 1.0), one_way, failed,
        np.where(delay >= 0, np.log1p(np.maximum(delay, 0.0)), -1.0),
        np.log1p(c("src2dst_duration_ms")), np.log1p(c("dst2src_duration_ms")),
    ]
    for direction in ("bidirectional", "src2dst", "dst2src"):
        cols += [_framed(c(f"{direction}_min_ps")), _framed(c(f"{direction}_mean_ps")), c(f"{direction}_stddev_ps"),
                 _framed(c(f"{direction}_max_ps"))]
    cols += [np.log1p(c(f"bidirectional_{s}_piat_ms")) for s in ("min", "mean", "stddev", "max")]
    cols += [np.log1p(c(f"{d}_{s}_piat_ms")) for d in ("src2dst", "dst2src") for s in ("mean", "stddev")]
    cols += [c(f"src2dst_{f}_packets") / safe_s for f in _FLAGS]
    cols += [c(f"dst2src_{f}_packets") / safe_d for f in _FLAGS]
    cols += [np.log1p(c("src2dst_syn_packets")), np.log1p(c("src2dst_rst_packets")),
             np.log1p(c("dst2src_syn_packets")), np.log1p(c("dst2src_rst_packets")),
             c("application_is_guessed")]
    # Early packets: size signed by direction (NFStream marks unused slots with direction -1).
    present = splt_dirs >= 0
    sizes = np.maximum(splt_sizes, MIN_FRAME)
    signed = np.where(present, np.where(splt_dirs == 0, sizes, -sizes), 0.0)
    cols += [signed[:, i] for i in range(SPLT_PACKETS)]
    changes = np.sum(present[:, 1:] & present[:, :-1] & (splt_dirs[:, 1:] != splt_dirs[:, :-1]), axis=1)
    cols.append(changes)
    return np.column_stack([np.asarray(col, dtype=np.float64) for col in cols])


def _failed(raw: np.ndarray) -> np.ndarray:
    """Unanswered, refused (responder RST) or never set up (SYN without SYN-ACK)."""
    d_pk = raw[:, _R["dst2src_packets"]]
    tcp = raw[:, _R["protocol"]] == 6
    refused = raw[:, _R["dst2src_rst_packets"]] > 0
    no_synack = (raw[:, _R["src2dst_syn_packets"]] > 0) & (raw[:, _R["dst2src_syn_packets"]] == 0)
    return ((d_pk == 0) | (tcp & (refused | no_synack))).astype(np.float64)


def _tracker_columns(raw: np.ndarray, srcs: Sequence[str], dsts: Sequence[str]) -> list[Sequence[Any]]:
    """What ContextTracker.observe takes of each flow, for a batch of _RAW_NUMERIC rows and their addresses;
    computed with numpy (log1p by the math module, as before: numpy's may differ in the last bit)."""
    def c(name: str) -> np.ndarray:
        return raw[:, _R[name]]

    back = c("dst2src_packets")
    nbytes = np.maximum(c("src2dst_bytes"), MIN_FRAME * c("src2dst_packets")) + \
        np.maximum(c("dst2src_bytes"), MIN_FRAME * back)
    return [(c("bidirectional_last_seen_ms") / 1000.0).tolist(), (c("bidirectional_first_seen_ms") / 1000.0).tolist(),
            srcs, dsts, c("dst_port").astype(np.int64).tolist(), c("protocol").astype(np.int64).tolist(),
            list(map(math.log1p, nbytes.tolist())), _failed(raw).tolist(), (back == 0).astype(np.float64).tolist(),
            (c("bidirectional_packets") <= 1).astype(np.float64).tolist()]


class FeatureExtractor:
    """Collects flows of one capture or interface and turns them into feature rows, a batch at a time.

    ``add`` keeps a flow's packed statistics and its addresses and application names (a whole
    NFStream flow's statistics it packs itself); ``take`` folds the flows added since the last call
    into the tracker, in the order they came, and returns their feature matrix, in FEATURE_NAMES
    order, with the application and category codes of ``vocabulary`` (a model's; None leaves them
    at 0 and keeps the names in ``names`` for training, which builds its vocabulary later) and the
    request signatures of ``requests`` (the request pass's findings; None leaves them at 0).
    """

    def __init__(self, vocabulary: dict[str, list[str]] | None = None,
                 tracker: ContextTracker | None = None) -> None:
        self.tracker = tracker or ContextTracker()
        self.links = LinkTracker()
        self.vocabulary: dict[str, list[str]] | None = None
        self._app_index: dict[str, int] | None = None
        self._cat_index: dict[str, int] | None = None
        if vocabulary:
            self.use_vocabulary(vocabulary)
        self._stats: list[Any] = []  # per flow: the meter's block, a whole flow's packed statistics, or held numbers
        self._metered: list[bool | None] = []  # which of the two (None: neither, a held flow's numbers instead)
        self._names: list[tuple[str, str, str, str, Any, str, str]] = []  # see _get_names
        self._folded: list[bool] = []  # which flows are a flood's, folded: no row, only their context counted
        self.names: list[tuple[str, str]] = []  # (master app, category) per row, when vocabulary is None
        self.requests: RequestFindings | None = None
        # what the last take found of the folded flows, in order: their source's and destination host's flows
        # of the first context window after them (see ContextTracker.observe_batch)
        self.folded_flows: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return len(self._stats)

    def use_vocabulary(self, vocabulary: dict[str, list[str]]) -> None:
        """Encode applications and categories with these codes from the next ``take`` on."""
        self.vocabulary = vocabulary
        self._app_index = {n: i + 1 for i, n in enumerate(vocabulary["app"])}
        self._cat_index = {n: i + 1 for i, n in enumerate(vocabulary["category"])}

    def add(self, flow: Any, folded: bool = False) -> None:
        """A flow for the next ``take``: a row of features, or with ``folded`` (a flood's flow that a flood record
        counts instead of a flow record) none, its context counted in order with the others."""
        self._folded.append(folded)
        if type(flow) is MeteredFlow:
            if flow.statistics is None:
                raise ValueError("the flow was metered without the classifier's statistics "
                                 "(see metered_flow_with_statistics)")
            self._stats.append(flow.statistics)
            self._metered.append(True)
        else:
            self._stats.append(pack_statistics(flow))
            self._metered.append(False)
        self._names.append(_get_names(flow))

    def add_held(self, flows: Sequence[Any]) -> None:
        """Flows the meter held (records.HeldFlows), folded: only their context is counted, in order."""
        n = len(flows)
        self._folded.extend([True] * n)
        self._stats.extend(map(_get_held_raw, flows))
        self._metered.extend([None] * n)
        self._names.extend(map(_get_names, flows))

    def take(self) -> np.ndarray:
        """Feature rows (float32) of the flows added since the last take but the folded ones, in FEATURE_NAMES
        order; what the folded ones gave goes to ``folded_flows``."""
        n = len(self._stats)
        if n == 0:
            self.folded_flows = []
            return np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)
        srcs, dsts, apps, cats, guessed, src_macs, dst_macs = (list(column)
                                                               for column in zip(*self._names, strict=True))
        raw, splt_dirs, splt_sizes = self._numbers()
        raw[:, _R["application_is_guessed"]] = guessed
        folded = self._folded if any(self._folded) else None
        context = self.tracker.observe_batch(*_tracker_columns(raw, srcs, dsts), folded=folded)
        if folded is not None:  # the flows with a row: the others' context is counted, in order, and set aside
            self.folded_flows = [c for c, fold in zip(context, folded, strict=True) if fold]
            kept = [i for i, fold in enumerate(folded) if not fold]
            context = [context[i] for i in kept]
            srcs, dsts, apps, cats, src_macs, dst_macs = ([column[i] for i in kept] for column in (
                srcs, dsts, apps, cats, src_macs, dst_macs))
            raw, splt_dirs, splt_sizes = raw[kept], splt_dirs[kept], splt_sizes[kept]
            n = len(kept)
        else:
            self.folded_flows = []
        self._stats, self._metered, self._names, self._folded = [], [], [], []
        X = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
        if n == 0:
            return X
        n_flow = len(_PER_FLOW)
        multicast = np.fromiter(map(_is_multicast, dsts), dtype=np.float64, count=len(dsts))
        X[:, :n_flow] = per_flow_features(raw, multicast, splt_dirs, splt_sizes)
        if self._app_index is not None:
            X[:, n_flow] = _codes(apps, lambda a: self._app_index.get(master_app(a), 0))
            X[:, n_flow + 1] = _codes(cats, lambda c: self._cat_index.get(c or "Unknown", 0))
        else:
            X[:, n_flow:n_flow + 2] = 0.0
            self.names.extend(zip(map(master_app, apps), (c or "Unknown" for c in cats), strict=True))
        if self.requests is not None and self.requests.matched:
            X[:, _SIGNATURE_COLUMNS] = self._request_codes(raw, srcs, dsts)
        else:
            X[:, _SIGNATURE_COLUMNS] = 0.0
        X[:, _INTERCEPTED_COLUMN] = self.links.observe_batch(srcs, src_macs, dsts, dst_macs)
        X[:, _FIRST_CONTEXT:] = context_features(np.asarray(context, dtype=np.float64))
        return X

    def _numbers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's _RAW_NUMERIC values and early packets' directions and sizes (float64), from the
        meter's blocks and from whole flows' packed statistics alike."""
        n = len(self._stats)
        raw = np.empty((n, len(_RAW_NUMERIC)))
        dirs, sizes = np.empty((n, SPLT_PACKETS)), np.empty((n, SPLT_PACKETS))
        metered = np.fromiter((m is True for m in self._metered), dtype=bool, count=n)
        if None in self._metered:
            held = np.fromiter((m is None for m in self._metered), dtype=bool, count=n)
            raw[held] = 0.0
            dirs[held], sizes[held] = -1.0, 0.0
            raw[np.ix_(held, _HELD_COLUMNS)] = [s for s, m in zip(self._stats, self._metered, strict=True) if m is None]
        else:
            held = np.zeros(n, dtype=bool)
        if metered.any():
            block = np.frombuffer(b"".join(s for s, m in zip(self._stats, self._metered, strict=True) if m),
                                  dtype=flow_block_dtype(SPLT_PACKETS))
            for name, i in _R.items():
                if name == "application_is_guessed":
                    continue
                column = block[name].astype(np.float64)
                if name in _SUMS_OF_SQUARES:  # as NFlow computes it (too few values: left as the meter has it)
                    count, lost = _SUMS_OF_SQUARES[name]
                    values = block[count].astype(np.float64) - lost
                    column = np.where(values > 0, np.sqrt(column / np.maximum(values, 1.0)), column)
                raw[metered, i] = column
            dirs[metered], sizes[metered] = block["splt_direction"], block["splt_ps"]
        whole = ~(metered | held)
        if whole.any():
            packed = np.frombuffer(b"".join(s for s, m in zip(self._stats, self._metered, strict=True) if m is False),
                                   dtype="<f8").reshape(-1, _STATS.size // 8)
            raw[whole] = packed[:, :len(_RAW_NUMERIC)]
            dirs[whole], sizes[whole] = packed[:, len(_RAW_NUMERIC):-SPLT_PACKETS], packed[:, -SPLT_PACKETS:]
        return raw, dirs, sizes

    def _request_codes(self, raw: np.ndarray, srcs: list[str], dsts: list[str]) -> np.ndarray:
        """(rows, 3): each flow's own signature code (TCP, UDP and ICMP flows: a pass matches no other), its
        pair's and its named hosts'."""
        findings = self.requests
        assert findings is not None
        columns = (raw[:, _R[name]].astype(np.int64).tolist() for name in (
            "src_port", "dst_port", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms", "protocol"))
        codes, matched = findings.codes, _MATCHED_PROTOCOLS
        return np.array([codes(src, sport, dst, dport, first, last, proto in matched)
                         for src, dst, sport, dport, first, last, proto in zip(srcs, dsts, *columns, strict=True)],
                        dtype=np.float32).reshape(-1, 3)


def pack_statistics(flow: Any) -> bytes:
    """What the features read of a whole NFStream flow (not one the meter reduced), packed (float64): its
    statistics and early packets."""
    try:
        splt = (*flow.splt_direction, *flow.splt_ps)
    except AttributeError:  # metered without early packets: none known
        splt = _NO_SPLT
    return _STATS.pack(*_get_raw(flow), *splt)


def metered_flow_with_statistics(flow: Any) -> tuple:
    """What the main pass's meter sends of a flow when it is scored (MeterConfig.reduce, the reader making it a
    MeteredFlow): the record's values and, as the classifier's statistics, the flow's block of NFStream's C
    numbers (see iotscan.capture.flows.flow_block_dtype), decoded a batch at a time by ``take``."""
    return (*flow_attributes(flow), flow.block, flow.ndpi)


def _codes(names: list[str], code: Any) -> np.ndarray:
    """Codes of a batch of names, computed once per distinct name."""
    table: dict[str, int] = {}
    out = np.empty(len(names), dtype=np.float32)
    for i, name in enumerate(names):
        c = table.get(name)
        if c is None:
            c = table[name] = code(name)
        out[i] = c
    return out


def apply_vocabulary(X: np.ndarray, names: Sequence[tuple[str, str]], vocabulary: dict[str, list[str]]) -> None:
    """Fill the app and category code columns of rows extracted without a vocabulary (training)."""
    n_flow = len(_PER_FLOW)
    X[:, n_flow] = encode_names([a for a, _ in names], vocabulary["app"])
    X[:, n_flow + 1] = encode_names([c for _, c in names], vocabulary["category"])


def feature_index(names: Sequence[str]) -> list[int]:
    return [_COL[n] for n in names]


# -- reasons: feature groups a person can read ----------------------------------------------------

def _reason_groups(spec: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, list[str]]]:
    """Each feature goes to the first group whose patterns match it; every feature must find one."""
    import fnmatch

    claimed: set[str] = set()
    groups = []
    for phrase, patterns in spec:
        names = [n for n in FEATURE_NAMES if n not in claimed and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        claimed.update(names)
        groups.append((phrase, names))
    assert claimed == set(FEATURE_NAMES), sorted(set(FEATURE_NAMES) - claimed)
    assert len(groups) <= 15, "the scorer packs one 4-bit bin per group into 60 bits"
    return groups


# The scorer names the groups whose replacement by typical benign values lowers a flow's score most.
REASON_GROUPS: list[tuple[str, list[str]]] = _reason_groups([
    ("many failed or unanswered connections", ["*fail_share_*", "*unanswered_share_*", "failed"]),
    ("many flows from this source in a short time", ["src_log_flows_*"]),
    ("this source contacted many different hosts", ["src_log_new_hosts_*", "src_new_host_share_*"]),
    ("this source probed many different ports", ["src_log_new_ports_*", "src_new_port_share_*"]),
    # the victim's view: a flood from many sources, or one source's repeated connections (guessing, reconnecting)
    ("many flows to one host or service (flood-like)", ["dst_log_*", "dst_new_src_share_*", "svc_log_*",
                                                         "svc_new_src_share_*", "*single_share_*"]),
    ("many repeated connections from this source to one service", ["chan_log_flows_*"]),
    ("repeated connections to one server at regular intervals (beacon-like)",
     ["chan_log_repeats", "chan_log_mean_interval_s", "chan_interval_cv", "chan_size_dev", "beacon_score"]),
    ("uniform flow sizes from this source or to this host or service", ["*_bytes_std_*"]),
    ("no reply or one-sided traffic", ["one_way", "dst2src_byte_share", "dst2src_packet_share",
                                       "log_*packets", "early_direction_changes"]),
    ("unusual packet sizes", ["*_ps", "early*_size", "log_bytes", "log_*_bytes"]),
    ("unusual TCP flags (SYN/RST/FIN pattern)", ["*2*_*_share", "log_*_syn", "log_*_rst"]),
    ("unusual timing or packet rate", ["log_*duration_ms", "log_*piat_ms", "log_response_delay_ms",
                                       "log_packet_rate"]),
    ("application unusual for benign traffic", ["app_code", "category_code", "app_guessed", *SIGNATURE_FEATURES,
                                                INTERCEPTED]),
    ("port unusual for benign traffic", ["*port_class", "src_port_below_dst"]),
    ("protocol", ["proto_*", "ip_v6", "dst_multicast"]),
])
