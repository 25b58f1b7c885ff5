"""The scoring stage: a verdict, a calibrated score, a family and reasons on every flow.

Flows are featurised as they arrive (one attribute fetch and a context update each) and scored a
batch at a time with one vectorised ``predict_proba`` call: a batch is flushed at ``batch_rows``
flows, at the end of a source, and -- on a live interface -- when a flow arrives and the oldest
waiting one is ``max_delay_s`` old, so streaming is delayed by at most one batch. (A stage only runs
when a flow arrives: on a link that falls silent the last flows wait for the next one or the end.)
On a capture file, the first flows also wait for the request pass (up to HELD_FOR_REQUESTS of them;
beyond that the reader waits too).

The model is a dict (see iotscan/training/train.py): a binary detector (attack vs benign; gradient-boosted
trees, as arrays: iotscan.detect.trees), a calibration curve mapping its probability to the probability of attack,
the threshold chosen on validation data, a family classifier (a forest) applied to the flows judged attacks,
the nDPI vocabulary and
the typical benign feature values the reasons are measured against. A flow whose packets matched a
signature (an HTTP request, DNS queries, a scanner's probe, a bot's command, refused logins: the
request pass, beside the main one: a second pass over a file, a second capture on an interface) is
an attack of the signature's family with score 1, whatever the detector says; so are the other flows
of its two hosts around it (an exploit's callbacks, a scanner's other probes: see
request_findings.PAIR_AFTER_MATCH_MS), unless the match was a DNS one; and so are an ICMP flood (icmp_flood) and a
flow sent through another local host's MAC (features.LinkTracker: ARP or neighbour-discovery spoofing).
With ``fold_floods`` (--flood-records summary), a flood's one- and two-packet flows are folded into flood records
instead (iotscan.detect.flood).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from iotscan.detect import trees
from iotscan.detect.features import (
    CONTEXT_FEATURES,
    FEATURE_NAMES,
    FEATURE_SCHEMA_VERSION,
    INTERCEPTED,
    METER_SETTINGS,
    NAMED_SIGNATURE,
    PAIR_SIGNATURE,
    REQUEST_SIGNATURE,
    FeatureExtractor,
    feature_index,
    metered_flow_with_statistics,
)
from iotscan.detect.flood import FLOOD_FAMILIES, FOLD_MAX_PACKETS, FloodFolder
from iotscan.detect.modelstore import bundled_model, load_model, verified_card
from iotscan.detect.request_findings import Flow5, RequestFindings
from iotscan.detect.request_signatures import SIGNATURES
from iotscan.detect.request_stage import ReadsRequests, RequestPassStage
from iotscan.errors import ModelError
from iotscan.output.records import HeldFlows, community_id
from iotscan.stage import Event, SourceInfo

MODEL_NAME = "flows"
BATCH_ROWS = 4096
LIVE_BATCH_ROWS = 128
LIVE_MAX_DELAY_S = 1.0
# On a live interface, the flows that ended more than an idle timeout and this long ago have all come: the meter's
# idle scan, its batches (0.2 s), its block of packets (0.25 s) and the queue between
LIVE_FLOWS_LAG_MS = 2_000
# Flows held while the request pass still runs (it reads the whole file, only faster): beyond this the
# reader waits for it instead, so memory stays bounded on a capture whose pass takes long.
HELD_FOR_REQUESTS = 16_384
MAX_REASONS = 3
# key order as VERDICT_FIELDS
_BENIGN = {"verdict": "benign", "score": None, "family": None, "reasons": None, "evidence_community_id": None}
_MIN_DROP = 0.05  # log-odds a group must account for to be named
_CELL_BITS = 4  # a group's deviation bin, log2 robust units, 0..15: 15 groups fit in 60 bits
# The signature columns, in the order they decide: the flow's own match, its pair's, its named hosts'
_SIGNATURE_COLS = [FEATURE_NAMES.index(n) for n in (REQUEST_SIGNATURE, PAIR_SIGNATURE, NAMED_SIGNATURE)]
# By signature code (0: none), for whole batches: the family, and the reason by column
_SIGNATURE_FAMILY = np.array(["", *(s.family for s in SIGNATURES)], dtype=object)
_SIGNATURE_REASONS = [np.array(["", *(getattr(s, kind) for s in SIGNATURES)], dtype=object)
                      for kind in ("reason", "pair_reason", "named_reason")]
# Families by rule (see rule_families). The decayed counts of the 5 s window hold about 7 s of flows
# at a steady rate: 54 of them is about 7.5 new flows a second, sustained.
FLOOD_FLOWS_5S = 54.0  # to one host
ONE_SOURCE_SHARE = 0.75  # of the host's recent flows sent by the flow's own source: one attacker
SCANNER_FLOWS = 10.0  # a source with at least this many recent flows (120 s window) ...
SCANNER_NEW_SHARE = 0.3  # ... of which this share went to ports or hosts new to it, is scanning
GUESSES_5S = 15.0  # connections of one client to one service: about 2 a second, sustained
GUESS_MAX_MS = 10_000
# An ICMP flow at a flood ping's rate is an attack whatever the detector says: ping -f sends 100 echo
# requests a second or more (ping(8)), and no benign capture here has an ICMP flow of even 30 a second.
# A flood is one flow, so the flows-per-host rule above never sees it.
ICMP_FLOOD_RATE = 100.0  # packets a second, over the flow's life and one second more (log_packet_rate)
ICMP_FLOOD_PACKETS = 1_000  # ten seconds of it
# A flood's bystanders: while a host is flooded, its own context (flows to it, their failures, new sources) makes
# every flow to it look like the flood's, the hub's sensors and the phone polling it too. A flow that is a whole
# exchange (answered both ways, not failed) from a source that sent at most this share of the host's recent
# flows is judged without the destination's context (replaced by typical benign values): by itself and its
# source's. A flood's flows are unanswered, refused or one source's; a distributed one's sources each send many.
BYSTANDER_MAX_SHARE = 0.1
# A client retrying a service that refuses or ignores it (curl in a loop against a closed port, a device
# calling a dead cloud endpoint): its failed flows repeat on one channel, and that repetition builds a context
# (flows and failures at one host, from one source) that looks like a flood's or a guesser's. No detector in
# use calls retries an attack, so a failed flow of a source that sent at least this share of its recent flows
# on the flow's channel, to a host not flooded (FLOOD_FLOWS_5S), is judged without any context: by itself.
RETRY_CHANNEL_SHARE = 0.9
RULE_REASONS = {"dos": "a flood of one host, mostly from this source (DoS)",
                "ddos": "a flood of one host from many sources (DDoS)",
                "bruteforce": "one client reconnecting to one service about twice a second or more (password guessing)"}
ICMP_FLOOD_REASON = "ICMP at a flood ping's rate (100 packets a second or more)"
INTERCEPTED_REASON = "sent to a local host through the MAC another local host sends from (ARP or ND spoofing)"
SYNACK_REASON = "unsolicited SYN-ACKs at a flood's rate (a SYN-ACK reflection)"
_RULE_PHRASES = frozenset((*RULE_REASONS.values(), ICMP_FLOOD_REASON, SYNACK_REASON))
_INTERCEPTED_COL = FEATURE_NAMES.index(INTERCEPTED)
_RULE_COLUMNS = {n: FEATURE_NAMES.index(n) for n in (
    "dst_log_flows_5s", "src_log_flows_5s", "src_log_flows_120s", "src_new_port_share_120s", "src_new_host_share_120s",
    "chan_log_flows_5s", "proto_tcp", "one_way", "log_dst2src_packets", "log_duration_ms",
    "proto_icmp", "log_packets", "log_packet_rate", "failed", "log_src2dst_packets", "chan_log_flows_120s",
    "src2dst_syn_share", "src2dst_ack_share")}
# The destination host's and service's context (not the flow's own port class or multicast address)
_DESTINATION_CONTEXT = np.array([i for i, n in enumerate(FEATURE_NAMES) if n.startswith(("dst_", "svc_"))
                                 and n not in ("dst_port_class", "dst_multicast")], dtype=np.intp)
_CONTEXT = np.array([i for i, n in enumerate(FEATURE_NAMES) if n in CONTEXT_FEATURES], dtype=np.intp)
_REQUIRED_KEYS = ("feature_schema_version", "feature_names", "detector", "detector_features", "calibration",
                  "threshold", "family_model", "families", "vocabulary", "reference", "scale", "reason_groups")


def check_bundled_flow_model() -> dict[str, Any]:
    """The bundled model's card, after verifying the file against it and the card against this
    iotscan's features, without unpickling (see ScoringStage)."""
    path = bundled_model(MODEL_NAME)
    card = verified_card(path)
    if card.get("feature_schema_version") != FEATURE_SCHEMA_VERSION \
            or (card.get("features") or {}).get("names") != FEATURE_NAMES:
        raise ModelError(f"{path}: the model was built for feature schema {card.get('feature_schema_version')}, "
                         f"this iotscan computes schema {FEATURE_SCHEMA_VERSION}: reinstall iotscan")
    return card


def load_flow_model(path: Path | None = None, trusted: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bundled model (verified by SHA-256), or a user's own with ``trusted`` (--trust-model)."""
    if path is None:
        model, card = load_model(bundled_model(MODEL_NAME), trusted=False, schema_version=FEATURE_SCHEMA_VERSION)
    else:
        if not trusted:
            raise ModelError(f"{path}: a model file is a pickle and loading it runs code: pass --trust-model "
                             "to load a model you made or trust")
        model, card = load_model(path, trusted=True, schema_version=FEATURE_SCHEMA_VERSION)
    missing = [k for k in _REQUIRED_KEYS if k not in model]
    if missing:
        raise ModelError(f"{path or bundled_model(MODEL_NAME)}: not an iotscan flow model (missing "
                         f"{', '.join(missing)})")
    try:  # a model trained before iotscan kept its trees as arrays holds scikit-learn's estimators
        for key in ("detector", "family_model"):
            model[key] = trees.compact(model[key])
        family_model = model["family_model"]
        other_rows = model["detector"].n_features != len(model["detector_features"]) \
            or (family_model is not None and family_model.n_features != len(FEATURE_NAMES))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelError(f"{path or bundled_model(MODEL_NAME)}: not an iotscan flow model ({exc})") from exc
    if other_rows:
        raise ModelError(f"{path or bundled_model(MODEL_NAME)}: the model's trees take other rows than its feature "
                         "list says: a damaged or foreign model")
    if list(model["feature_names"]) != FEATURE_NAMES:
        raise ModelError(f"{path or bundled_model(MODEL_NAME)}: the model's feature list differs from this "
                         "iotscan's: retrain it (iotscan model train)")
    return model, card


# -- the model's arithmetic, shared by the stage and `model evaluate` -----------------------------

def attack_scores(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """Calibrated probability of attack per row (a flood's bystanders judged without the destination's
    context: see as_judged)."""
    if len(X) == 0:
        return np.empty(0)
    decided = _decided(X)
    out = np.ones(len(X))
    asked = np.flatnonzero(~decided)  # the detector is asked about the others only
    if len(asked):
        raw = model["detector"].predict_proba(as_judged(model, X)[np.ix_(asked, _detector_columns(model))])[:, 1]
        xs, ys = model["calibration"]
        out[asked] = np.interp(raw, xs, ys)
    return out


def attack_families(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """The family of each row (rows assumed to be attacks): a matched signature's (but a scan signature's
    flow that the flood rule names is a flood), else spoofing for a flow through another host's MAC, else
    the family a rule gives floods and password guessing (see rule_families), else the family model's most
    likely one."""
    families = np.asarray(model["families"], dtype=object)
    if len(X) == 0:
        return np.empty(0, dtype=object)
    X = as_judged(model, X)
    out = np.full(len(X), families[0], dtype=object)
    ruled = rule_families(X)
    named = ruled != ""
    out[named] = ruled[named]
    intercepted = X[:, _INTERCEPTED_COL] > 0
    out[intercepted] = "spoofing"
    family = _SIGNATURE_FAMILY[_deciding_code(X)[0]]
    # a probe at a flood's rate is a flood: hping3 and its kin send scanners' packets
    signed = (family != "") & ~((family == "scan") & ((ruled == "dos") | (ruled == "ddos")))
    out[signed] = family[signed]
    family_model = model["family_model"]
    asked = np.flatnonzero(~(named | intercepted | signed))  # the family model is asked about the others only
    if family_model is not None and len(asked):
        out[asked] = families[np.argmax(family_model.votes(X[asked]), axis=1)]
    return out


def rule_families(X: np.ndarray) -> np.ndarray:
    """"dos", "ddos" or "bruteforce" for rows that fit those families' definitions, "" for the others
    (rows assumed to be attacks).

    These families are defined by a pattern of flows -- how many sources flood one host, how fast one
    client reconnects to one service -- which a family model learns only from examples of each; one
    that has seen floods of one kind, or no password guessing, calls them anything (measured leave
    one source out: lab floods from one source were named scan or exploit, guessing exploit). So
    they are decided by rule, from the context features, in this order:

    * a flood: the flow's destination host receives flows at a flood's rate (FLOOD_FLOWS_5S) and the
      flow's source is no scanner (a port or address scan also converges on its target); from one
      source (dos) when the flow's own source sent most of the host's recent flows
      (ONE_SOURCE_SHARE), from many (ddos: spoofed, reflected or distributed) otherwise;
    * password guessing (bruteforce): one client opens TCP connections to one service at a rate no
      ordinary client keeps up (GUESSES_5S), each answered with an exchange of a few packets and over
      within seconds (a slow-read DoS holds its connections open instead).
    """
    def c(name: str) -> np.ndarray:
        return X[:, _RULE_COLUMNS[name]]

    scanner = (c("src_log_flows_120s") >= np.log1p(SCANNER_FLOWS)) & (
        (c("src_new_port_share_120s") >= SCANNER_NEW_SHARE) | (c("src_new_host_share_120s") >= SCANNER_NEW_SHARE))
    flood = _flooded(X) & ~scanner
    own_share = _own_share(X)
    guessing = (c("chan_log_flows_5s") >= np.log1p(GUESSES_5S)) & (c("proto_tcp") == 1) & (c("one_way") == 0) \
        & (c("log_dst2src_packets") >= np.log1p(3)) & (c("log_duration_ms") < np.log1p(GUESS_MAX_MS)) \
        & ~flood & ~scanner
    out = np.full(len(X), "", dtype=object)
    out[guessing] = "bruteforce"
    out[flood] = np.where(own_share[flood] >= ONE_SOURCE_SHARE, "dos", "ddos")
    out[icmp_flood(X) & ~flood] = "dos"
    out[synack_reflection(X)] = "ddos"  # reflected, whatever share one reflector sends
    return out


def flood_bystanders(X: np.ndarray) -> np.ndarray:
    """Rows of whole exchanges with a flooded host from a source that sent few of its flows (see
    BYSTANDER_MAX_SHARE)."""
    def c(name: str) -> np.ndarray:
        return X[:, _RULE_COLUMNS[name]]

    whole = (c("one_way") == 0) & (c("failed") == 0) & (c("log_dst2src_packets") >= np.log1p(2)) \
        & (c("log_src2dst_packets") >= np.log1p(2))
    return _flooded(X) & (_own_share(X) <= BYSTANDER_MAX_SHARE) & whole


def client_retries(X: np.ndarray) -> np.ndarray:
    """Rows of a client retrying one service that refuses or ignores it (see RETRY_CHANNEL_SHARE)."""
    def c(name: str) -> np.ndarray:
        return X[:, _RULE_COLUMNS[name]]

    source_flows = np.expm1(c("src_log_flows_120s"))
    return (c("failed") == 1) & (source_flows >= 2.0) & ~_flooded(X) \
        & (np.expm1(c("chan_log_flows_120s")) >= RETRY_CHANNEL_SHARE * source_flows)


def as_judged(model: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """The rows as the detector, the family rules and the reasons judge them: a flood's bystanders' (see
    flood_bystanders) with the destination's context replaced by the model's typical benign values, a client's
    retries' (see client_retries) with all their context replaced. X itself when there are none."""
    bystanders = np.flatnonzero(flood_bystanders(X))
    retries = np.flatnonzero(client_retries(X))
    if not len(bystanders) and not len(retries):
        return X
    X = X.copy()
    reference = np.asarray(model["reference"], dtype=X.dtype)
    X[np.ix_(bystanders, _DESTINATION_CONTEXT)] = reference[_DESTINATION_CONTEXT]
    X[np.ix_(retries, _CONTEXT)] = reference[_CONTEXT]
    return X


def _flooded(X: np.ndarray) -> np.ndarray:
    """Rows whose destination host receives flows at a flood's rate (FLOOD_FLOWS_5S)."""
    return X[:, _RULE_COLUMNS["dst_log_flows_5s"]] >= np.log1p(FLOOD_FLOWS_5S)


def _own_share(X: np.ndarray) -> np.ndarray:
    """The share of the destination host's recent flows that the row's source sent."""
    sent = np.expm1(X[:, _RULE_COLUMNS["src_log_flows_5s"]])
    return sent / np.maximum(np.expm1(X[:, _RULE_COLUMNS["dst_log_flows_5s"]]), 1.0)


def folded_families(flows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flows folded before they were scored, from their source's and destination host's flows of the shorter
    window (n, 2; see FeatureExtractor.folded_flows): whether the destination still receives flows at a flood's
    rate, and the family the flood rule gives them, from these counts as rule_families reads them (a source the
    context tracker did not know is no scanner)."""
    logs = np.log1p(flows.reshape(-1, 2)).astype(np.float32)  # as the feature rows hold them
    flooded = logs[:, 1] >= np.log1p(FLOOD_FLOWS_5S)
    share = np.expm1(logs[:, 0]) / np.maximum(np.expm1(logs[:, 1]), 1.0)
    return flooded, np.where(share >= ONE_SOURCE_SHARE, "dos", "ddos")


def icmp_flood(X: np.ndarray) -> np.ndarray:
    """Rows of ICMP flows at a flood ping's rate (ICMP_FLOOD_RATE, for ICMP_FLOOD_PACKETS or more)."""
    return (X[:, _RULE_COLUMNS["proto_icmp"]] == 1) \
        & (X[:, _RULE_COLUMNS["log_packets"]] >= np.log1p(ICMP_FLOOD_PACKETS)) \
        & (X[:, _RULE_COLUMNS["log_packet_rate"]] >= np.log1p(ICMP_FLOOD_RATE))


def _deciding_code(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's deciding signature code (0: none; codes beyond this iotscan's list read as none) and the
    column it came from (0 own, 1 pair, 2 named)."""
    codes = X[:, _SIGNATURE_COLS]
    codes = np.where(codes <= len(SIGNATURES), codes, 0).astype(np.intp)
    column = np.argmax(codes > 0, axis=1)  # the first that holds one
    return codes[np.arange(len(codes)), column], column


def synack_reflection(X: np.ndarray) -> np.ndarray:
    """Rows of a SYN-ACK reflection: flows whose initiator sent only SYN-ACKs (no connection starts so: they answer
    SYNs spoofed from the victim) to a host flooded with flows (FLOOD_FLOWS_5S)."""
    def c(name: str) -> np.ndarray:
        return X[:, _RULE_COLUMNS[name]]

    return (c("proto_tcp") == 1) & (c("src2dst_syn_share") == 1) & (c("src2dst_ack_share") == 1) & _flooded(X)


def _decided(X: np.ndarray) -> np.ndarray:
    """Rows that are attacks whatever the detector says: a signature's (the flow's own packets matched one, a
    flow of its two hosts did, or an exploit request one of its hosts received named the other), an ICMP
    flood's, a SYN-ACK reflection's, or a flow through another host's MAC (features.LinkTracker)."""
    return (_deciding_code(X)[0] > 0) | icmp_flood(X) | synack_reflection(X) | (X[:, _INTERCEPTED_COL] > 0)


def explain(model: dict[str, Any], X: np.ndarray, alike: dict[int, list[str]] | None = None) -> list[list[str]]:
    """Up to MAX_REASONS phrases per row: the feature groups whose replacement by typical benign values
    lowers the detector's log-odds most, after what decided the row's family when it was not the family
    model (a matched signature, or the rule that named a flood or password guessing).

    Rows whose groups stray from typical benign values by a similar amount (each group's mean distance,
    in robust units, on a log2 scale) share one computation, on their first row: a flood or a scan is
    explained once per batch, not once per flow. ``alike`` keeps those computations (by how the rows stray)
    from one call to the next: the rows of later calls that stray alike share them too.
    """
    if len(X) == 0:
        return []
    X = as_judged(model, X)
    detector = model["detector"]
    reference = np.asarray(model["reference"], dtype=np.float32)
    groups = model["reason_groups"]
    membership = _membership(model)
    deviation = (np.abs(X - reference) / model["scale"]) @ membership
    cells = np.minimum(np.floor(np.log2(1.0 + deviation)), 2 ** _CELL_BITS - 1).astype(np.int64)
    # the bins packed into one integer: a 1-D unique is far cheaper than one over rows
    signature = cells @ (np.int64(1) << (_CELL_BITS * np.arange(cells.shape[1], dtype=np.int64)))
    keys, first, inverse = np.unique(signature, return_index=True, return_inverse=True)
    known = {} if alike is None else alike
    todo = [j for j, key in enumerate(keys.tolist()) if key not in known]
    if todo:
        U = X[first[todo]]
        n, g = len(U), len(groups)
        probes = np.repeat(U[None, :, :], g + 1, axis=0)  # the rows as they are, then one copy per group
        for k, (_, cols) in enumerate(groups, start=1):
            probes[k][:, cols] = reference[cols]
        logit = detector.decision_function(probes.reshape((g + 1) * n, -1)[:, _detector_columns(model)]
                                           ).reshape(g + 1, n)  # one call
        drops = logit[0][None, :] - logit[1:]
        order = np.argsort(-drops, axis=0, kind="stable")[:MAX_REASONS]
        for j, key in enumerate(keys[todo].tolist()):
            known[key] = [groups[k][0] for k in order[:, j] if drops[k, j] > _MIN_DROP]
    phrases = [known[key] for key in keys.tolist()]
    out = [phrases[i] for i in inverse.ravel()]
    ruled = rule_families(X)
    flooding = icmp_flood(X)
    reflected = synack_reflection(X)
    for i in np.flatnonzero(ruled != ""):  # what made the family: the detector's reasons do not say it
        first = ICMP_FLOOD_REASON if flooding[i] else SYNACK_REASON if reflected[i] else RULE_REASONS[ruled[i]]
        out[i] = [first, *out[i][:MAX_REASONS - 1]]
    for i in np.flatnonzero(X[:, _INTERCEPTED_COL] > 0):
        out[i] = [INTERCEPTED_REASON, *out[i][:MAX_REASONS - 1]]
    code, column = _deciding_code(X)
    reason = np.choose(column, [reasons[code] for reasons in _SIGNATURE_REASONS])
    for i in np.flatnonzero(code > 0):  # the signature first: it decided
        out[i] = [reason[i], *[p for p in out[i] if p not in _RULE_PHRASES][:MAX_REASONS - 1]]
    return out


def _detector_columns(model: dict[str, Any]) -> np.ndarray:
    """The columns of the feature rows the detector takes; cached in the model dict."""
    cached = model.get("_detector_columns")
    if cached is None:
        cached = model["_detector_columns"] = np.array(feature_index(model["detector_features"]), dtype=np.intp)
    return cached


def _membership(model: dict[str, Any]) -> np.ndarray:
    """(features, groups) matrix averaging each group's features; cached in the model dict."""
    cached = model.get("_membership")
    if cached is None:
        groups = model["reason_groups"]
        cached = np.zeros((len(model["feature_names"]), len(groups)), dtype=np.float32)
        for k, (_, cols) in enumerate(groups):
            cached[cols, k] = 1.0 / len(cols)
        model["_membership"] = cached
    return cached


# -- the stage ------------------------------------------------------------------------------------

# One signature match marks many flows (a scanner's probes, an exploit's downloads): its id is hashed once.
@functools.lru_cache(maxsize=4096)
def _flow5_community_id(flow: Flow5) -> str | None:
    return community_id(flow[0], flow[2], flow[4], flow[1], flow[3])


class ScoringStage(ReadsRequests):
    """Adds verdict, score, family and reasons to every flow record."""

    def __init__(self, model_path: Path | None = None, trusted: bool = False, threshold: float | None = None,
                 batch_rows: int = BATCH_ROWS, fold_floods: bool = False,
                 requests: RequestPassStage | None = None) -> None:
        super().__init__(requests)  # the request pass: shared with the risk stage, or its own
        self.fold_floods = fold_floods  # --flood-records summary: see iotscan.detect.flood
        self._folder: FloodFolder | None = None
        if fold_floods:  # a flood's probes need not be kept: its flows are folded (RequestFindings.flood_rate)
            self.requests.flood_rate = FLOOD_FLOWS_5S
        self._model: dict[str, Any] | None = None
        if model_path is None:
            # The bundled model is verified against its card now (a tampered or mismatched model stops
            # the run before it starts) and unpickled at the first batch, once the meter runs (a model made
            # before iotscan kept its trees as arrays imports scikit-learn: that then overlaps metering).
            self.card = check_bundled_flow_model()
        else:
            self._model, self.card = load_flow_model(model_path, trusted)
        default = self.card["threshold"] if self._model is None else self._model["threshold"]
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ModelError(f"--threshold must be between 0 and 1, not {threshold}")
        self.threshold = float(default if threshold is None else threshold)
        self.batch_rows = batch_rows
        self.max_delay_s: float | None = None
        self._extractor: FeatureExtractor | None = None
        self._threads: Any = None
        self._source: SourceInfo | None = None
        self.scored = 0
        # explanations shared by alike attacks among each run of batch_rows flows of a source (see _reasons)
        self._alike: dict[int, list[str]] = {}
        self._alike_run = -1
        self._source_scored = 0

    @property
    def model(self) -> dict[str, Any]:
        return self.load()

    def load(self) -> dict[str, Any]:
        """The model, unpickled on first use."""
        if self._model is None:
            self._model, _ = load_flow_model()
        if self._threads is None:
            # One thread for OpenMP (the models) and BLAS (the reasons' matrix product): batches are small and
            # the meters need the other cores. More OpenMP threads add a synchronisation per tree (ten times
            # slower on a busy machine); OpenBLAS's idle threads spin after each product, and on 2 cores took
            # 1.2 s of CPU from the meter on the benchmark capture.
            from threadpoolctl import threadpool_limits

            self._threads = threadpool_limits(limits=1)
        return self._model

    def begin(self, source: SourceInfo) -> None:
        cfg = source.config
        whole_or_packed = cfg.reduce in (None, metered_flow_with_statistics)
        if not cfg.statistics or cfg.splt < METER_SETTINGS["splt"] or not whole_or_packed:
            raise ModelError("scoring needs the meter's statistics and early-packet sizes "
                             f"(statistics=True, splt>={METER_SETTINGS['splt']}, flows sent whole or with statistics)")
        if cfg.live:
            self.batch_rows, self.max_delay_s = min(self.batch_rows, LIVE_BATCH_ROWS), LIVE_MAX_DELAY_S
            self.load()  # before capturing: on a live link, packets must not wait for it
        # Context is per capture: a new source starts with no history. The model's vocabulary is given to
        # the extractor at its first batch, once the model is loaded (see _score).
        self._extractor = FeatureExtractor()
        self._folder = None
        if self.fold_floods:
            self._folder = FloodFolder(source.name, self._extractor.tracker, cfg.idle_timeout, FLOOD_FLOWS_5S,
                                       RULE_REASONS, lambda message: self.warn(source.name, "flood_records", message),
                                       live=cfg.live, meter=source.meter)
        super().begin(source)
        self._source = source
        self._alike, self._alike_run, self._source_scored = {}, -1, 0

    def metering(self) -> None:
        """Start the request pass beside the main one, now that the main meter runs (so the forks do not race).

        On a file it runs ahead of the main pass and the first flows wait for its findings. On a live
        interface it is a second capture, whose matches leave its meter at once: flows are scored with
        the findings known by then (a flow is scored when it expires, long after its requests)."""
        super().metering()
        if self._extractor is not None and self._extractor.requests is None:
            self._extractor.requests = self.requests.live_findings()

    def _requests_running(self) -> bool:
        return self._extractor is not None and self._extractor.requests is None and self.requests.running()

    def claims(self, flow: Any) -> bool:
        """A flood's flow to fold without a flow record (see iotscan.detect.flood); the flows the meter held, always
        (it held them because the service it claimed was flooded: iotscan.capture.hold)."""
        folder = self._folder
        return folder is not None and (type(flow) is HeldFlows or (bool(folder.claimed) and folder.claims(flow)))

    def ongoing(self) -> list[dict[str, Any]]:
        return self._folder.ongoing if self._folder is not None else []

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        extractor = self._extractor
        assert extractor is not None, "begin() first"
        pending: list[Event] = []
        batch_rows, max_delay = self.batch_rows, self.max_delay_s
        oldest = 0.0
        for event in events:
            record, flow = event
            if flow is None:  # a heartbeat of a quiet live link: flush what has waited long enough
                if pending and max_delay is not None and time.monotonic() - oldest >= max_delay:
                    yield from self._score(pending)
                    pending = []
                if self._folder is not None:  # and the flood records no flow can come to any more
                    yield from self._flood_events(self._folder.closed(int(time.time() * 1000) - self._folder.idle_ms
                                                                      - LIVE_FLOWS_LAG_MS))
                yield event
                continue
            if not pending and max_delay is not None:
                oldest = time.monotonic()
            if type(flow) is HeldFlows:  # a batch the meter held: each flow claimed, in order
                extractor.add_held(flow)
                pending.extend(zip(repeat(None), flow))
            else:
                extractor.add(flow, folded=record is None)  # a flow claimed (see claims) has no record
                pending.append(event)
            if len(pending) >= batch_rows and self._requests_running() and len(pending) < HELD_FOR_REQUESTS:
                continue  # flows wait for the request pass, up to a bound, rather than the reader
            if len(pending) >= batch_rows or (max_delay is not None and time.monotonic() - oldest >= max_delay):
                yield from self._score(pending)
                pending = []
        if self.requests.live:
            self.requests.findings()  # the capture stopped: so does the request pass, adding its last matches
        if pending:
            yield from self._score(pending)
        if self._folder is not None:
            yield from self._flood_events(self._folder.flush())

    @staticmethod
    def _flood_events(records: list[dict[str, Any]]) -> list[Event]:
        return [(record, None) for record in records]

    def _score(self, pending: list[Event]) -> list[Event]:
        extractor = self._extractor
        assert extractor is not None
        model = self.model
        if extractor.vocabulary is None:
            extractor.use_vocabulary(model["vocabulary"])
        if extractor.requests is None:
            extractor.requests = self.requests.findings() or RequestFindings()
        X = extractor.take()
        # positions in the batch of the flows scored (the others were claimed: folded, without a record)
        claimed = [i for i, (record, _) in enumerate(pending) if record is None] if extractor.folded_flows else []
        scored = np.setdiff1d(np.arange(len(pending)), claimed) if claimed else np.arange(len(pending))
        events = [pending[i] for i in scored.tolist()] if claimed else pending
        scores = attack_scores(model, X)
        attack = np.flatnonzero(scores >= self.threshold)
        families = attack_families(model, X[attack]) if len(attack) else []
        reasons = self._reasons(model, X, attack, scored[attack])
        benign = _BENIGN
        for (record, _), score in zip(events, np.round(scores, 4).tolist(), strict=True):
            record.update(benign)
            record["score"] = score
        for i, family, why in zip(attack.tolist(), families, reasons, strict=True):
            record = events[i][0]
            record["verdict"] = "attack"
            record["family"] = family
            record["reasons"] = why
        if len(attack) and extractor.requests is not None:
            self._link_evidence([events[i][0] for i in attack.tolist()], X[attack], extractor.requests)
        self.scored += len(pending)
        self._source_scored += len(pending)
        if self._folder is None:
            return events
        ruled = rule_families(as_judged(model, X[attack])) if len(attack) else []
        return self._fold(pending, claimed, events, attack, families, ruled)

    def _fold(self, pending: list[Event], claimed: list[int], events: list[Event], attack: np.ndarray,
              families: Any, ruled: Any) -> list[Event]:
        """The batch's events once a flood's flows are folded (iotscan.detect.flood): the flows claimed before
        they were scored, and the attacks of at most FOLD_MAX_PACKETS packets whose family the flood rule gave
        (``ruled``: not the family model's, which names a dos or ddos without a flood; their service is claimed
        from then on); then the flood records no flow can come to any more."""
        folder = self._folder
        assert folder is not None and self._extractor is not None
        if claimed:
            flooded, claimed_families = folded_families(np.asarray(self._extractor.folded_flows))
            folder.fold_claimed([pending[i][1] for i in claimed], claimed_families.tolist(), flooded.tolist())
        folded = set()
        for i, family, rule in zip(attack.tolist(), families, ruled, strict=True):
            r = events[i][0]
            if family == rule and family in FLOOD_FAMILIES and r["packets"] <= FOLD_MAX_PACKETS and folder.fold(
                    (r["dst_ip"], r["dst_port"], r["protocol"]), r["dst_mac"], r["src_ip"], r["src_port"],
                    r["first_seen_ms"], r["last_seen_ms"], r["packets"], r["bytes"], r["dst2src_packets"] > 0,
                    family):
                folded.add(i)
        if folded:
            events = [e for i, e in enumerate(events) if i not in folded]
        ended = max(f.bidirectional_last_seen_ms for _, f in pending)
        return events + self._flood_events(folder.closed(ended))

    def _reasons(self, model: dict[str, Any], X: np.ndarray, attack: np.ndarray, positions: np.ndarray
                 ) -> list[list[str]]:
        """explain() for the attack rows of a batch (at ``positions`` in the batch, which also held the flows folded
        before they were scored). Alike attacks share the reasons of the first of them within each run of
        batch_rows flows of the source, counted from its start, whatever the batches were: a file's first batch
        holds the flows that came before the request pass ended, and reasons must not depend on when that was."""
        reasons: list[list[str]] = []
        runs = (self._source_scored + positions) // self.batch_rows
        for run in np.unique(runs).tolist():
            if run != self._alike_run:
                self._alike, self._alike_run = {}, run
            reasons += explain(model, X[attack[runs == run]], self._alike)
        return reasons

    @staticmethod
    def _link_evidence(records: list[dict[str, Any]], X: np.ndarray, findings: RequestFindings) -> None:
        """evidence_community_id of the attacks a signature decided through another flow (pair_signature,
        named_signature): that flow's, so a person goes from the marked flow to the request that matched."""
        code, column = _deciding_code(X)
        for i in np.flatnonzero((code > 0) & (column > 0)).tolist():
            r = records[i]
            flow = findings.marking_flow(r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["first_seen_ms"],
                                         r["last_seen_ms"], named=column[i] == 2)
            if flow is not None:
                r["evidence_community_id"] = _flow5_community_id(flow)

    def summarize(self, summary: dict[str, Any]) -> None:
        super().summarize(summary)
        summary["model"] = {"name": self.card.get("model_file", MODEL_NAME), "sha256": self.card.get("sha256"),
                            "threshold": self.threshold}
