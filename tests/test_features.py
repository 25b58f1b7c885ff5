"""The feature code path: the feature list, the context tracker on hand-built flows, real captures."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.detect import context, features
from iotscan.detect.context import ContextTracker
from iotscan.detect.features import (
    CONTEXT_FEATURES,
    FEATURE_NAMES,
    METER_SETTINGS,
    REASON_GROUPS,
    FeatureExtractor,
)
from iotscan.detect.scoring import ScoringStage
from iotscan.errors import ModelError
from iotscan.output.records import MeteredFlow, flow_record, metered_flow
from iotscan.stage import SourceInfo
from tests.conftest import SAMPLES


def col(X: np.ndarray, name: str) -> np.ndarray:
    return X[:, FEATURE_NAMES.index(name)]


def make_flow(src: str, dst: str, dport: int, first_s: float, *, proto: int = 6, sport: int = 40000,
              packets: int = 1, nbytes: int = 60, answered: bool = False, duration_ms: int = 0) -> SimpleNamespace:
    """A synthetic NFStream flow (for the tracker's unit tests only): a SYN probe by default."""
    back = 1 if answered else 0
    n_splt = features.SPLT_PACKETS
    f = SimpleNamespace(
        protocol=proto, ip_version=4, src_port=sport, dst_port=dport, src_ip=src, dst_ip=dst, src_mac="", dst_mac="",
        bidirectional_first_seen_ms=int(first_s * 1000), bidirectional_last_seen_ms=int(first_s * 1000) + duration_ms,
        bidirectional_duration_ms=duration_ms, bidirectional_packets=packets + back,
        bidirectional_bytes=nbytes + 60 * back, src2dst_packets=packets, src2dst_bytes=nbytes,
        dst2src_packets=back, dst2src_bytes=60 * back, src2dst_duration_ms=duration_ms, dst2src_duration_ms=0,
        src2dst_first_seen_ms=int(first_s * 1000), dst2src_first_seen_ms=int(first_s * 1000) + 1 if back else 0,
        application_is_guessed=1, application_name="Unknown", application_category_name="Unspecified",
        splt_direction=([0] * packets + [1] * back + [-1] * 10)[:n_splt],
        splt_ps=([nbytes // packets] * (packets + back) + [0] * 10)[:n_splt])
    for direction in ("bidirectional", "src2dst", "dst2src"):
        for stat in ("min", "mean", "stddev", "max"):
            setattr(f, f"{direction}_{stat}_ps", 0.0 if stat == "stddev" else nbytes / packets)
            setattr(f, f"{direction}_{stat}_piat_ms", 0.0)
    for direction in ("src2dst", "dst2src"):
        for flag in ("syn", "cwr", "ece", "urg", "ack", "psh", "rst", "fin"):
            setattr(f, f"{direction}_{flag}_packets", 0)
    f.src2dst_syn_packets = 1 if proto == 6 else 0
    f.dst2src_syn_packets = back if proto == 6 else 0  # answered: a SYN-ACK
    return f


def extract(flows: list[SimpleNamespace]) -> np.ndarray:
    ex = FeatureExtractor({"app": ["HTTP"], "category": ["Web"]})
    for f in flows:
        ex.add(f)
    return ex.take()


def test_feature_list_is_pinned_and_clean() -> None:
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    # no addresses, MACs, raw ports or absolute times among the features
    banned = re.compile(r"(^|_)(ip|mac|oui|vlan|port|first_seen|last_seen|timestamp)($|_)")
    assert not [n for n in FEATURE_NAMES if banned.search(n) and not n.endswith("port_class")
                and n not in ("src_port_below_dst", "ip_v6") and "new_port" not in n]
    # every feature is explained by exactly one reason group
    grouped = [n for _, names in REASON_GROUPS for n in names]
    assert sorted(grouped) == sorted(FEATURE_NAMES)
    assert isinstance(features.FEATURE_SCHEMA_VERSION, int)


def test_a_flow_sent_through_another_local_hosts_mac_is_intercepted() -> None:
    # arpspoof on .16 between a sensor (.71) and its hub (.27): the sensor's flows to the hub go to .16's MAC
    hub, sensor, spoofer, router = "aa:00:00:00:00:27", "aa:00:00:00:00:71", "aa:00:00:00:00:16", "aa:00:00:00:00:01"

    def flow(src: str, src_mac: str, dst: str, dst_mac: str, t: float) -> SimpleNamespace:
        f = make_flow(src, dst, 1883, t)
        f.src_mac, f.dst_mac = src_mac, dst_mac
        return f

    flows = [
        flow("192.168.28.71", sensor, "192.168.28.27", spoofer, 100.0),  # the hub not yet seen sending: unknown
        flow("192.168.28.27", hub, "192.168.28.71", sensor, 101.0),  # the hub sends from its own MAC
        flow("192.168.28.16", spoofer, "192.168.28.71", sensor, 102.0),  # so does the spoofer
        flow("192.168.28.71", sensor, "192.168.28.27", spoofer, 103.0),  # to the hub through the spoofer's MAC
        flow("192.168.28.71", sensor, "192.168.28.27", hub, 104.0),  # to the hub's own MAC
        flow("192.168.28.1", router, "192.168.28.71", sensor, 105.0),  # the router, from its own MAC
        flow("192.168.28.71", sensor, "93.184.216.34", router, 106.0),  # a remote host, through the router
        flow("192.168.28.71", sensor, "192.168.28.1", router, 107.0),  # the router itself
        flow("192.168.29.5", "aa:00:00:00:00:05", "192.168.28.71", sensor, 108.0),  # another /24 ...
        flow("192.168.28.71", sensor, "192.168.28.27", "aa:00:00:00:00:05", 109.0),  # ... is no local host of it
    ]
    assert col(extract(flows), "intercepted").tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # bounded: the tables keep the last learned hosts
    tracker = context.LinkTracker(max_keys=3)
    tracker.observe_batch([f"10.0.0.{i}" for i in range(10)], [f"aa:00:00:00:00:{i:02x}" for i in range(10)],
                          ["10.0.1.1"] * 10, [""] * 10)
    assert len(tracker.own) == 3 and len(tracker.sender) == 3 and "10.0.0.9" in tracker.own


def test_neighbour_discovery_spoofing_is_intercepted_on_local_ipv6_links() -> None:
    # the same man in the middle over IPv6 (parasite6, or a spoofed neighbour advertisement): unique-local and
    # link-local addresses are local, each /64 a subnet; a global address may be on the link or not: not local
    hub, sensor, spoofer, border = ("aa:00:00:00:00:27", "aa:00:00:00:00:71", "aa:00:00:00:00:16",
                                    "aa:00:00:00:00:b0")

    def flow(src: str, src_mac: str, dst: str, dst_mac: str, t: float) -> SimpleNamespace:
        f = make_flow(src, dst, 5683, t, proto=17)
        f.src_mac, f.dst_mac, f.ip_version = src_mac, dst_mac, 6
        return f

    flows = [
        flow("fd00::27", hub, "fd00::71", sensor, 101.0),
        flow("fd00::16", spoofer, "fd00::71", sensor, 102.0),
        flow("fd00::71", sensor, "fd00::27", spoofer, 103.0),  # to the hub through the spoofer's MAC
        flow("fe80::27", hub, "fe80::71", sensor, 104.0),
        flow("fe80::16", spoofer, "fe80::71", sensor, 105.0),
        flow("fe80::71", sensor, "fe80::27", spoofer, 106.0),  # the same on the link-local addresses
        flow("fd00::71", sensor, "fd00::27", hub, 107.0),  # to the hub's own MAC
        # a Thread border router sends for its mesh's devices (another /64) and carries their flows both ways
        flow("fd00:0:0:1::5", border, "fd00::71", sensor, 108.0),
        flow("fd00:0:0:1::6", border, "fd00::71", sensor, 109.0),
        flow("fd00::71", sensor, "fd00:0:0:1::5", border, 110.0),
        # global addresses: a host of another network may answer through the router's MAC
        flow("2001:db8::27", hub, "2001:db8::71", sensor, 111.0),
        flow("2001:db8::16", spoofer, "2001:db8::71", sensor, 112.0),
        flow("2001:db8::71", sensor, "2001:db8::27", spoofer, 113.0),
    ]
    assert col(extract(flows), "intercepted").tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]


def test_scan_from_one_source_shows_in_its_context() -> None:
    # one source probes 60 ports of one host, 20 ms apart, none answered; then one ordinary flow elsewhere
    probes = [make_flow("10.0.0.66", "10.0.0.5", 1000 + i, 100.0 + i * 0.02) for i in range(60)]
    normal = make_flow("10.0.0.7", "10.0.0.5", 443, 101.3, packets=10, nbytes=2000, answered=True,
                       duration_ms=300)
    X = extract([*probes, normal])
    last_probe, first_probe, other = X[59], X[0], X[60]
    assert np.exp(col(X, "src_log_new_ports_5s")[59]) - 1 > 40  # ~60 distinct ports, decayed a little
    assert col(X, "src_new_port_share_5s")[59] > 0.95
    assert col(X, "src_unanswered_share_5s")[59] == pytest.approx(1.0)
    assert col(X, "src_fail_share_5s")[59] == pytest.approx(1.0)
    assert col(X, "src_log_new_hosts_5s")[59] <= np.log1p(1.0) + 1e-6  # one host only (its novelty decays)
    # the first probe had no history; the other source has its own (empty) history
    assert first_probe[FEATURE_NAMES.index("src_log_flows_5s")] == pytest.approx(np.log1p(1.0))
    assert last_probe[FEATURE_NAMES.index("src_log_flows_5s")] > np.log1p(50)
    assert other[FEATURE_NAMES.index("src_log_flows_5s")] == pytest.approx(np.log1p(1.0))
    assert other[FEATURE_NAMES.index("src_fail_share_5s")] == 0.0
    # but the victim's view counts both sources
    assert np.exp(other[FEATURE_NAMES.index("dst_log_new_srcs_120s")]) - 1 == pytest.approx(2.0, abs=0.1)


def test_horizontal_scan_counts_hosts() -> None:
    probes = [make_flow("10.0.0.66", f"10.0.1.{i}", 23, 50.0 + i * 0.05) for i in range(40)]
    X = extract(probes)
    assert np.exp(col(X, "src_log_new_hosts_5s")[-1]) - 1 > 30
    assert col(X, "src_new_port_share_5s")[-1] < 0.1  # one port


def test_beacon_scores_regular_intervals_and_sizes() -> None:
    rng = np.random.default_rng(1)
    regular = [make_flow("10.0.0.9", "198.51.100.7", 6667, 1000.0 + 30.0 * i, sport=41000 + i, packets=4,
                         nbytes=300, answered=True) for i in range(15)]
    irregular_times = np.cumsum(rng.exponential(30.0, 15)) + 1000.0
    irregular = [make_flow("10.0.0.10", "203.0.113.9", 443, float(t), sport=42000 + i, packets=4,
                           nbytes=int(rng.integers(200, 20000)), answered=True) for i, t in enumerate(irregular_times)]
    Xr, Xi = extract(regular), extract(irregular)
    assert col(Xr, "beacon_score")[-1] > 0.8
    assert col(Xr, "chan_interval_cv")[-1] < 0.05
    assert np.exp(col(Xr, "chan_log_mean_interval_s")[-1]) - 1 == pytest.approx(30.0, rel=0.01)
    assert col(Xi, "beacon_score")[-1] < 0.3
    assert col(Xr, "beacon_score")[1] < 0.3  # two flows are not yet a beacon


def test_capture_side_padding_does_not_change_features() -> None:
    # the same SYN probes seen at the sender (54-byte frames) and at the receiver (padded to 60)
    sent = extract([make_flow("10.0.0.66", "10.0.0.5", 23, 10.0 + i * 0.01, sport=40000 + i, nbytes=54)
                    for i in range(20)])
    received = extract([make_flow("10.0.0.66", "10.0.0.5", 23, 10.0 + i * 0.01, sport=40000 + i, nbytes=60)
                        for i in range(20)])
    np.testing.assert_array_equal(sent, received)


def test_spoofed_flood_shows_in_the_victims_view() -> None:
    # one flow per spoofed source, single unanswered packets: each source looks harmless alone
    flood = [make_flow(f"203.0.{i // 256}.{i % 256}", "10.0.0.5", 80, 20.0 + i * 0.001, sport=1024 + i)
             for i in range(500)]
    X = extract(flood)
    assert col(X, "src_log_flows_5s")[-1] == pytest.approx(np.log1p(1.0))
    assert np.exp(col(X, "dst_log_new_srcs_5s")[-1]) - 1 > 300
    assert col(X, "dst_single_share_5s")[-1] == pytest.approx(1.0)
    assert col(X, "dst_unanswered_share_5s")[-1] == pytest.approx(1.0)
    assert col(X, "svc_new_src_share_5s")[-1] > 0.95


def test_channel_counts_every_flow_including_its_first() -> None:
    # three connections from one source to one service, 1 s apart: the third sees all three
    X = extract([make_flow("10.0.0.9", "10.0.0.5", 22, 200.0 + i, sport=50000 + i, packets=5, nbytes=400,
                           answered=True) for i in range(3)])
    flows = np.exp(col(X, "chan_log_flows_120s")) - 1
    assert flows[0] == pytest.approx(1.0)
    assert flows[2] == pytest.approx(1.0 + 2 ** (-1 / 120) + 2 ** (-2 / 120))
    assert flows[2] == pytest.approx(np.exp(col(X, "src_log_flows_120s")[2]) - 1)


def test_tracker_memory_is_bounded_by_cap_and_time() -> None:
    tracker = ContextTracker(max_keys=100)
    for i in range(5000):  # a spoofed flood: every flow from a new source
        tracker.observe(float(i) / 100, float(i) / 100, f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", "10.9.9.9",
                        80, 6, 4.1, 1.0, 1.0, 1.0)
    tracker.sweep()
    assert len(tracker.src) <= 100 and len(tracker.chan) <= 100
    assert len(tracker.dst) == 1 and len(tracker.svc) == 1
    assert all(len(state[-1]) <= context.SET_CAP for state in tracker.dst.values())
    # an hour of capture time later every key has expired
    tracker.observe(3600.0 + 50, 3600.0 + 50, "10.1.1.1", "10.2.2.2", 80, 6, 4.1, 0.0, 0.0, 0.0)
    tracker.sweep()
    assert tracker.tracked_keys() == 4


@pytest.mark.parametrize("name", ["synflood-spoofed.pcap", "hue-bridge-setup.pcap"])
def test_real_capture_rows_are_finite_and_deterministic(name: str) -> None:
    def rows() -> np.ndarray:
        ex = FeatureExtractor({"app": ["DNS", "TLS"], "category": ["Network", "Web"]})
        for flow in FlowSource(MeterConfig(source=str(SAMPLES / name), **METER_SETTINGS)):
            ex.add(flow)
        return ex.take()

    a, b = rows(), rows()
    assert a.shape[1] == len(FEATURE_NAMES) and len(a) > 100
    assert np.isfinite(a).all()
    assert np.array_equal(a, b)
    if name.startswith("synflood"):
        # spoofed SYNs: single packets, unanswered, many sources converging on one service
        assert np.median(col(a, "one_way")) == 1.0
        assert np.median(col(a, "svc_log_new_srcs_5s")) > np.log1p(20)
    else:
        assert col(a, "app_code").max() > 0  # DNS or TLS seen and coded


def test_context_features_are_marked() -> None:
    assert "beacon_score" in CONTEXT_FEATURES and "src_log_flows_5s" in CONTEXT_FEATURES
    assert "log_packets" not in CONTEXT_FEATURES and "request_signature" not in CONTEXT_FEATURES


def test_flows_packed_by_the_meter_give_the_rows_and_records_of_whole_flows() -> None:
    """The main pass's meter sends each flow as a MeteredFlow with its block of NFStream's C numbers (what
    `analyze` and training read); the unit tests hand whole flows to the same code. Both must give the same
    feature rows, bit for bit, and the same records."""
    capture = str(SAMPLES / "mirai-c2-irc.pcap")

    def meter(reduce: object) -> tuple[list, np.ndarray]:
        config = MeterConfig(source=capture, reduce=reduce, item_type=MeteredFlow if reduce else None,
                             **METER_SETTINGS)
        flows = list(FlowSource(config))
        ex = FeatureExtractor({"app": ["IRC", "DNS"], "category": ["Chat", "Network"]})
        for flow in flows:
            ex.add(flow)
        return flows, ex.take()

    whole, a = meter(None)
    packed, b = meter(features.metered_flow_with_statistics)
    assert len(whole) > 100 and not isinstance(whole[0], MeteredFlow)
    assert all(type(f) is MeteredFlow and len(f.statistics) > 400 for f in packed)
    assert np.array_equal(a, b)
    # the meter's block holds sums of squared deviations: the conversion to NFlow's deviations is exercised
    assert col(a, "stddev_ps").any() and col(a, "log_stddev_piat_ms").any() and col(a, "dst2src_stddev_ps").any()
    assert col(a, "early0_size").any() and col(a, "src_log_flows_120s").max() > np.log1p(5)
    assert [flow_record(f, capture, "x") for f in whole] == [flow_record(f, capture, "x") for f in packed]


def test_flows_sent_without_statistics_cannot_be_scored() -> None:
    flow = next(iter(FlowSource(MeterConfig(source=str(SAMPLES / "mirai-c2-irc.pcap"), reduce=metered_flow,
                                            item_type=MeteredFlow))))
    assert flow.statistics is None
    with pytest.raises(ValueError, match="without the classifier's statistics"):
        FeatureExtractor().add(flow)
    # and the scoring stage refuses such a meter before the first flow
    config = MeterConfig(source="x.pcap", reduce=metered_flow, **METER_SETTINGS)
    with pytest.raises(ModelError, match="statistics"):
        ScoringStage().begin(SourceInfo(name="x.pcap", config=config))
