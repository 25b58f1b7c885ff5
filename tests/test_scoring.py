"""Scoring in `analyze`: the bundled model, its verification, verdicts on real captures."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from iotscan.detect import scoring
from iotscan.detect.features import DETECTOR_FEATURES, FEATURE_NAMES, FEATURE_SCHEMA_VERSION
from iotscan.detect.modelstore import bundled_model, load_model, save_model, sha256_file
from iotscan.detect.scoring import (
    ICMP_FLOOD_REASON,
    INTERCEPTED_REASON,
    RULE_REASONS,
    ScoringStage,
    attack_families,
    attack_scores,
    explain,
    flood_bystanders,
    icmp_flood,
    load_flow_model,
    rule_families,
)
from iotscan.errors import ModelError
from iotscan.output import table
from iotscan.output.table import TableSink
from tests.conftest import REPO, SAMPLES, assert_no_traceback, ndjson, run_iotscan
from tests.test_features import extract, make_flow
from tests.test_request_pass import _ether, _ip4

FAMILIES = {"ddos", "dos", "scan", "bruteforce", "c2", "exploit", "spoofing"}


@pytest.fixture(scope="module")
def bundled() -> tuple[dict, dict]:
    return load_flow_model()


@pytest.fixture(scope="module")
def scored() -> dict[str, list[dict]]:
    """Every sample scored once (one analyze run), flows grouped by capture."""
    proc = run_iotscan("analyze", SAMPLES, "--format", "ndjson", "--no-devices", check_code=0)
    records = ndjson(proc.stdout)
    assert records[-1]["event_type"] == "summary"
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["event_type"] == "flow":
            out.setdefault(Path(r["source"]).name, []).append(r)
    out["_summary"] = [records[-1]]
    out["_alerts"] = [r for r in records if r["event_type"] == "alert"]
    return out


def test_bundled_model_loads_verified_and_small(bundled: tuple[dict, dict]) -> None:
    model, card = bundled
    path = bundled_model("flows")
    assert card["sha256"] == sha256_file(path)
    assert path.stat().st_size < 20 * 2**20
    assert model["feature_schema_version"] == FEATURE_SCHEMA_VERSION == card["feature_schema_version"]
    assert model["feature_names"] == FEATURE_NAMES
    assert 0.0 < model["threshold"] < 1.0 and model["threshold"] == card["threshold"]
    assert set(model["families"]) <= FAMILIES
    # the card carries the honest figures
    assert {"grouped_cv", "leave_one_source_out"} <= set(card["evaluation"])
    assert path.with_name("flows.card.md").is_file()


def _sample_rows() -> tuple[np.ndarray, np.ndarray]:
    """The feature rows of every flow of the samples (real NFStream), and the number of each one's capture."""
    from iotscan.capture.source import FlowSource
    from iotscan.cli.common import main_pass_config
    from iotscan.detect.features import FeatureExtractor

    rows, captures = [], []
    for k, path in enumerate(sorted(SAMPLES.glob("*.pcap"))):
        extractor = FeatureExtractor({"app": ["HTTP", "DNS", "IRC"], "category": ["Web", "Network", "Chat"]})
        for flow in FlowSource(main_pass_config(str(path), score=True)):
            if flow is not None:
                extractor.add(flow)
        rows.append(extractor.take())
        captures += [k] * len(rows[-1])
    return np.concatenate(rows), np.array(captures)


def test_trees_as_arrays_give_scikit_learns_numbers() -> None:
    # the models keep their trees as numpy arrays (iotscan.detect.trees) so that scoring does not import scikit-learn:
    # the same probabilities, bit for bit, missing values included, for gradient boosting and a forest
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    from iotscan.detect import trees

    X, capture = _sample_rows()
    rng = np.random.default_rng(0)
    X[rng.random(X.shape) < 0.02] = np.nan  # some values missing: splits learn where they go
    names = [p.stem for p in sorted(SAMPLES.glob("*.pcap"))]
    attack = np.isin(capture, [k for k, name in enumerate(names) if not name.endswith("-setup")])
    fit = rng.random(len(X)) < 0.5
    boosted = HistGradientBoostingClassifier(max_iter=15, max_leaf_nodes=15, random_state=0).fit(X[fit], attack[fit])
    forest = RandomForestClassifier(n_estimators=12, min_samples_leaf=2, random_state=0).fit(X[fit], capture[fit])
    ours_boosted, ours_forest = trees.compact(boosted), trees.compact(forest)
    assert isinstance(ours_boosted, trees.BoostedTrees) and isinstance(ours_forest, trees.Forest)
    assert ours_boosted.trees.missing_left.any()  # the missing values took a branch of their own somewhere
    np.testing.assert_array_equal(ours_boosted.decision_function(X), boosted.decision_function(X))
    np.testing.assert_array_equal(ours_boosted.predict_proba(X), boosted.predict_proba(X))
    np.testing.assert_array_equal(ours_forest.predict_proba(X), forest.predict_proba(X))
    np.testing.assert_array_equal(ours_forest.classes, forest.classes_)
    assert len(set(ours_boosted.predict_proba(X)[:, 1].round(3))) > 10  # not a constant


def test_a_model_holding_scikit_learn_estimators_still_loads(tmp_path: Path, bundled: tuple[dict, dict]) -> None:
    # a model trained before iotscan kept its trees as arrays (a user's own): its estimators are converted at load
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    from iotscan.detect import trees
    from iotscan.detect.scoring import _detector_columns

    X, capture = _sample_rows()
    attack = capture % 2 == 1
    model, card = bundled
    columns = _detector_columns(model)
    legacy = {k: v for k, v in model.items() if not k.startswith("_")}
    legacy["detector"] = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(X[:, columns], attack)
    legacy["family_model"] = RandomForestClassifier(n_estimators=5, random_state=0).fit(
        X, capture % len(model["families"]))
    path = tmp_path / "legacy.joblib"
    save_model(legacy, path, {k: v for k, v in card.items() if k != "sha256"}, "a legacy model")
    loaded, _ = load_flow_model(path, trusted=True)
    assert isinstance(loaded["detector"], trees.BoostedTrees) and isinstance(loaded["family_model"], trees.Forest)
    np.testing.assert_array_equal(loaded["detector"].predict_proba(X[:, columns]),
                                  legacy["detector"].predict_proba(X[:, columns]))
    # trees that take other rows than the model's feature list says are refused, not indexed out of bounds
    legacy["family_model"] = RandomForestClassifier(n_estimators=2, random_state=0).fit(X[:, :10], attack)
    save_model(legacy, path, {k: v for k, v in card.items() if k != "sha256"}, "a damaged model")
    with pytest.raises(ModelError, match="other rows"):
        load_flow_model(path, trusted=True)


def test_scoring_does_not_import_scikit_learn() -> None:
    # its import (scipy's modules with it) cost 0.8 s of CPU a run: the bundled models hold arrays only
    code = ("import runpy, sys\n"
            f"sys.argv = ['iotscan', 'analyze', {str(SAMPLES / 'hue-bridge-setup.pcap')!r}, '-f', 'ndjson', "
            "'-o', '/dev/null']\n"
            "try:\n    runpy.run_module('iotscan', run_name='__main__')\nexcept SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split() == ["[]"]


def test_scores_are_probabilities_and_reasons_are_words(bundled: tuple[dict, dict]) -> None:
    model, _ = bundled
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, len(FEATURE_NAMES))).astype(np.float32)
    X[:, [FEATURE_NAMES.index("app_code"), FEATURE_NAMES.index("category_code")]] = 0
    X[:, [FEATURE_NAMES.index("request_signature"), FEATURE_NAMES.index("pair_signature")]] = 0
    s = attack_scores(model, X)
    assert s.shape == (50,) and np.all((s >= 0) & (s <= 1))
    reasons = explain(model, X[:5])
    assert len(reasons) == 5 and all(isinstance(p, str) for r in reasons for p in r)


def test_detector_ignores_application_and_beacon_features(bundled: tuple[dict, dict]) -> None:
    # measured across sources, these let the detector learn which network a flow came from
    model, _ = bundled
    assert model["detector_features"] == DETECTOR_FEATURES
    left_out = [FEATURE_NAMES.index(n) for n in FEATURE_NAMES if n not in DETECTOR_FEATURES]
    # the signatures decide by themselves (see test_request_pass.py)
    signature_cols = [FEATURE_NAMES.index(n) for n in ("request_signature", "pair_signature", "named_signature",
                                                       "intercepted")]
    assert {FEATURE_NAMES[i] for i in left_out} == {"app_code", "category_code", "app_guessed", "chan_log_repeats",
                                                   "chan_log_mean_interval_s", "chan_interval_cv", "chan_size_dev",
                                                   "beacon_score", "request_signature", "pair_signature",
                                                   "named_signature", "intercepted"}
    left_out = [i for i in left_out if i not in signature_cols]
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    X[:, signature_cols] = 0
    changed = X.copy()
    changed[:, left_out] = rng.uniform(0, 50, size=(200, len(left_out)))
    assert np.array_equal(attack_scores(model, X), attack_scores(model, changed))
    # and reasons never name what the detector does not see
    phrases = {p for r in explain(model, X) for p in r}
    assert not any("beacon" in p or p.startswith("application") for p in phrases)
    # the family model still uses them: it names attacks already found
    family = model["family_model"]
    assert family.n_features == len(FEATURE_NAMES)
    split_on = set(family.trees.feature[family.trees.children[0::2] != np.arange(len(family.trees.feature))].tolist())
    assert split_on & set(left_out)


def test_a_request_signature_makes_an_exploit_whatever_the_detector_says(bundled: tuple[dict, dict]) -> None:
    model, _ = bundled
    rng = np.random.default_rng(2)
    X = rng.normal(size=(20, len(FEATURE_NAMES))).astype(np.float32)
    X[:, [FEATURE_NAMES.index("app_code"), FEATURE_NAMES.index("category_code")]] = 0
    col, pair = FEATURE_NAMES.index("request_signature"), FEATURE_NAMES.index("pair_signature")
    X[:, [col, pair, FEATURE_NAMES.index("named_signature"), FEATURE_NAMES.index("intercepted")]] = 0
    X[::2, col] = X[::2, pair] = 3  # SQL injection
    scores = attack_scores(model, X)
    assert np.all(scores[::2] == 1.0) and np.all(scores[1::2] < 1.0)
    assert set(attack_families(model, X[::2]).tolist()) == {"exploit"}
    reasons = explain(model, X)
    assert all(r[0] == "HTTP request matched an exploit signature: SQL injection" for r in reasons[::2])
    assert not any(p.startswith("HTTP request") for r in reasons[1::2] for p in r)
    # another flow of the same two hosts matched: the same decision, with the pair as the reason
    X[1::2, pair] = 10  # nmap service probe
    assert np.all(attack_scores(model, X) == 1.0)
    assert attack_families(model, X).tolist() == ["exploit", "scan"] * 10
    assert all(r[0] == "a flow between the same two hosts matched a signature within minutes: nmap service probe"
               for r in explain(model, X)[1::2])
    # a flow between the exploited host and a host its request named: after the own and the pair's
    named = FEATURE_NAMES.index("named_signature")
    X[:, pair] = 0
    X[1::2, named] = 5  # JNDI lookup (log4j)
    assert np.all(attack_scores(model, X) == 1.0)
    assert attack_families(model, X).tolist() == ["exploit"] * 20
    reasons = explain(model, X)
    assert all(r[0] == "HTTP request matched an exploit signature: SQL injection" for r in reasons[::2])
    assert all(r[0] == "the other host was named in an exploit request this host received within minutes: "
               "JNDI lookup (log4j)" for r in reasons[1::2])


def test_floods_and_guessing_are_named_by_rule(bundled: tuple[dict, dict]) -> None:
    model, _ = bundled
    victim = "10.0.0.5"
    # 5 s of a UDP flood from one source (200 flows/s, new source ports), while a neighbour polls the victim
    one = [make_flow("198.51.100.7", victim, 5683, 100.0 + i / 200, proto=17, sport=10000 + i) for i in range(1000)]
    one += [make_flow("10.0.0.9", victim, 80, 100.0 + i / 2, packets=4, nbytes=400, answered=True) for i in range(10)]
    one.sort(key=lambda f: f.bidirectional_last_seen_ms)  # the order flows expire in
    X = extract(one)
    families = rule_families(X)
    flood_rows = [i for i, f in enumerate(one) if f.src_ip == "198.51.100.7"]
    assert np.mean(families[flood_rows[100:]] == "dos") > 0.95  # once the rate is a flood's
    assert np.all(families[flood_rows[:20]] == "")  # the first flows are no flood yet
    assert set(attack_families(model, X[flood_rows[100:]]).tolist()) == {"dos"}
    assert all(r[0] == RULE_REASONS["dos"] and len(r) <= 3 for r in explain(model, X[flood_rows[100:]]))
    # the same rate from 1,000 spoofed sources, and from four attackers taking turns
    spoofed = [make_flow(f"203.0.{i // 250}.{i % 250}", victim, 80, 100.0 + i / 200) for i in range(1000)]
    assert np.mean(rule_families(extract(spoofed))[100:] == "ddos") > 0.95
    four = [make_flow(f"198.51.100.{i % 4}", victim, 80, 100.0 + i / 200, sport=10000 + i) for i in range(1000)]
    assert np.mean(rule_families(extract(four))[100:] == "ddos") > 0.95
    # a port scan converges on its target at the same rate: its source is a scanner, not a flooder
    scan = [make_flow("198.51.100.7", victim, 1 + i, 100.0 + i / 200) for i in range(1000)]
    assert np.all(rule_families(extract(scan)) == "")
    # password guessing: one client, 3 short SSH sessions a second for 20 s, each answered with a few packets
    guesses = [make_flow("198.51.100.7", victim, 22, 100.0 + i / 3, sport=20000 + i, packets=8, nbytes=900,
                         answered=True, duration_ms=600) for i in range(60)]
    for f in guesses:
        f.dst2src_packets, f.bidirectional_packets = 6, 14
    families = rule_families(extract(guesses))
    assert np.all(families[:10] == "") and np.mean(families[30:] == "bruteforce") > 0.95
    # the same sessions at an ordinary client's pace (one every 5 s) are no guessing
    for i, f in enumerate(guesses):
        f.bidirectional_first_seen_ms = f.src2dst_first_seen_ms = 100_000 + 5000 * i
        f.dst2src_first_seen_ms = f.bidirectional_first_seen_ms + 1
        f.bidirectional_last_seen_ms = f.bidirectional_first_seen_ms + 600
    assert np.all(rule_families(extract(guesses)) == "")


def test_a_floods_bystanders_are_judged_without_the_floods_context(bundled: tuple[dict, dict],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = bundled
    threshold = model["threshold"]
    victim = "10.0.0.5"
    # a SYN flood of the hub from one source (200 flows a second), while five sensors publish to its broker:
    # each connection answered, data both ways
    flood = [make_flow("198.51.100.7", victim, 80, 100.0 + i / 200, sport=10000 + i) for i in range(1000)]
    sensors = [make_flow(f"10.0.0.{20 + i % 5}", victim, 1883, 101.0 + i / 5, sport=30000 + i, packets=4,
                         nbytes=300, answered=True, duration_ms=40) for i in range(20)]
    for f in sensors:
        f.dst2src_packets, f.dst2src_bytes = 3, 180
        f.bidirectional_packets, f.bidirectional_bytes = 7, 480
    flows = sorted(flood + sensors, key=lambda f: f.bidirectional_last_seen_ms)
    X = extract(flows)
    sensor_rows = [i for i, f in enumerate(flows) if f.dst_port == 1883]
    flood_rows = [i for i, f in enumerate(flows) if f.dst_port == 80][100:]
    bystanders = flood_bystanders(X)
    assert bystanders[sensor_rows].all() and not bystanders[flood_rows].any()
    scores = attack_scores(model, X)
    assert np.mean(scores[flood_rows] >= threshold) > 0.95
    assert np.all(scores[sensor_rows] < threshold)
    # judged with the hub's context, the sensors' connections would be the flood's: what the rule is for
    monkeypatch.setattr(scoring, "BYSTANDER_MAX_SHARE", -1.0)
    assert np.mean(attack_scores(model, X)[sensor_rows] >= threshold) > 0.9


def _icmp_capture(path: Path, echoes: int, per_second: float) -> None:
    """Echo requests of 56 data bytes (ping's) from 10.0.0.2 to 10.0.0.1 at this rate, each answered."""
    frames, times = [], []
    for i in range(echoes):
        for icmp_type, src, dst in ((8, 2, 1), (0, 1, 2)):
            frames.append(_ether(_ip4(1, src, dst, struct.pack("!BBHHH", icmp_type, 0, 0, 7, i) + bytes(56)),
                                 0x0800, None))
            times.append(i / per_second)
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, frame in zip(times, frames, strict=True):
            f.write(struct.pack("<IIII", 1_700_000_000 + int(t), int(t % 1 * 1e6), len(frame), len(frame)) + frame)


def test_an_icmp_flood_is_a_dos_whatever_the_detector_says(tmp_path: Path, bundled: tuple[dict, dict]) -> None:
    # hping3 --icmp --faster, or ping -f: one flow of thousands of echoes (the flows-per-host rule never sees it)
    flood = tmp_path / "icmp-flood.pcap"
    _icmp_capture(flood, 3000, 500.0)
    ping = tmp_path / "ping.pcap"  # ping(8) at its pace: one a second for a minute
    _icmp_capture(ping, 60, 1.0)
    proc = run_iotscan("analyze", flood, ping, "-f", "ndjson", "--no-devices", check_code=0)
    flows = {Path(r["source"]).name: r for r in ndjson(proc.stdout) if r["event_type"] == "flow"}
    assert flows["icmp-flood.pcap"]["packets"] == 6000
    assert (flows["icmp-flood.pcap"]["verdict"], flows["icmp-flood.pcap"]["family"],
            flows["icmp-flood.pcap"]["score"]) == ("attack", "dos", 1.0)
    assert flows["icmp-flood.pcap"]["reasons"][0] == ICMP_FLOOD_REASON
    assert flows["ping.pcap"]["verdict"] == "benign"
    # the rule's edges, on feature rows: 1,000 packets or more at 100 a second or more
    model, _ = bundled
    rows = [make_flow("10.0.0.2", "10.0.0.1", 0, 100.0, proto=1, packets=n, nbytes=84 * n, duration_ms=ms)
            for n, ms in ((1000, 8_000), (999, 1_000), (5000, 60_000), (1000, 1_000))]
    tcp = make_flow("10.0.0.2", "10.0.0.1", 80, 100.0, packets=5000, nbytes=60 * 5000, duration_ms=1_000)
    X = extract([*rows, tcp])
    assert icmp_flood(X).tolist() == [True, False, False, True, False]
    assert np.all(attack_scores(model, X[icmp_flood(X)]) == 1.0)
    assert set(attack_families(model, X[icmp_flood(X)]).tolist()) == {"dos"}


def _ip_header(version: int, src: int, dst: int, payload: bytes, protocol: int = 17) -> bytes:
    """An IPv4 packet of 10.0.0.<src> to .<dst>, or an IPv6 one of fd00::<src> to fd00::<dst> (hex)."""
    if version == 4:
        return _ip4(protocol, src, dst, payload)
    return struct.pack("!IHBB", 0x60000000, len(payload), protocol, 64) + \
        bytes.fromhex(f"fd00{'00' * 13}{src:02x}") + bytes.fromhex(f"fd00{'00' * 13}{dst:02x}") + payload


@pytest.mark.parametrize("version", [4, 6])
def test_flows_through_a_spoofers_mac_are_spoofing(tmp_path: Path, version: int) -> None:
    # arpspoof (or, over IPv6, spoofed neighbour advertisements) on .16 between a sensor (.71) and its hub
    # (.27), forwarding: the sensor's flows to the hub go to .16's MAC; both the hub and .16 have sent from
    # their own MACs before
    macs = {0x16: b"\xaa\0\0\0\0\x16", 0x27: b"\xaa\0\0\0\0\x27", 0x71: b"\xaa\0\0\0\0\x71"}

    def frame(src: int, dst: int, dst_mac: bytes, sport: int) -> bytes:
        udp = struct.pack("!HHHH", sport, 5683, 12, 0) + b"coap"
        return dst_mac + macs[src] + (b"\x08\x00" if version == 4 else b"\x86\xdd") + _ip_header(version, src, dst, udp)

    frames = [frame(0x27, 0x71, macs[0x71], 40000), frame(0x16, 0x71, macs[0x71], 40001)]
    frames += [frame(0x71, 0x27, macs[0x16], 41000 + i) for i in range(3)]  # intercepted
    frames.append(frame(0x71, 0x27, macs[0x27], 42000))  # straight to the hub
    capture = tmp_path / "spoofed.pcap"
    with capture.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(fr), len(fr)) + fr)
    proc = run_iotscan("analyze", capture, "-f", "ndjson", "--no-devices", check_code=0)
    flows = {r["src_port"]: r for r in ndjson(proc.stdout) if r["event_type"] == "flow"}
    for port in (41000, 41001, 41002):
        assert (flows[port]["verdict"], flows[port]["family"], flows[port]["score"]) == ("attack", "spoofing", 1.0)
        assert flows[port]["reasons"][0] == INTERCEPTED_REASON
    assert flows[42000]["family"] != "spoofing" and INTERCEPTED_REASON not in (flows[42000]["reasons"] or [])
    assert all(flows[port]["family"] != "spoofing" for port in (40000, 40001))


def test_synflood_is_flagged_as_ddos(scored: dict[str, list[dict]]) -> None:
    flows = scored["synflood-spoofed.pcap"]
    attacks = [r for r in flows if r["verdict"] == "attack"]
    assert len(attacks) / len(flows) >= 0.95
    families = [r["family"] for r in attacks]
    assert families.count("ddos") / len(families) >= 0.8
    named = [r for r in attacks if r["family"] == "ddos"]
    assert sum(r["reasons"][0] == RULE_REASONS["ddos"] for r in named) / len(named) >= 0.9
    assert all(r["reasons"] and all(isinstance(p, str) for p in r["reasons"]) for r in attacks[:50])
    assert all(0.0 <= r["score"] <= 1.0 for r in flows)


def test_benign_iot_setup_captures_stay_almost_clean(scored: dict[str, list[dict]]) -> None:
    for name in ("tplink-hs110-setup.pcap", "hue-bridge-setup.pcap"):
        flows = scored[name]
        flagged = [r for r in flows if r["verdict"] == "attack"]
        assert len(flagged) <= max(1, 0.02 * len(flows)), (name, [(r["app"], r["score"]) for r in flagged])
        assert all(r["family"] is None and r["reasons"] is None for r in flows if r["verdict"] == "benign")


def test_mirai_c2_is_flagged(scored: dict[str, list[dict]]) -> None:
    flows = scored["mirai-c2-irc.pcap"]
    c2 = [r for r in flows if r["verdict"] == "attack" and r["family"] == "c2"]
    assert len(c2) / len(flows) >= 0.5


def test_summary_counts_attacks(scored: dict[str, list[dict]]) -> None:
    summary = scored["_summary"][0]
    families = Counter(r["family"] for name, flows in scored.items() if not name.startswith("_") for r in flows
                       if r["verdict"] == "attack")
    assert summary["attacks"] == sum(families.values()) > 0
    assert summary["attack_families"] == dict(families) and len(families) >= 3  # ddos, exploit, c2 at least
    assert list(summary["attack_families"].values()) == sorted(families.values(), reverse=True)


def test_marked_attacks_link_to_the_flow_that_matched(scored: dict[str, list[dict]]) -> None:
    """An attack a signature decided through another flow (its two hosts' flow matched, or an exploit request
    named one of them) carries that flow's community_id; it is an attack of the capture decided by its own
    packets, for the same signature. A flow the host-behaviour stage marked carries one of its alert's evidence
    flows'. No other flow carries one."""
    marked_reasons = ("a flow between the same two hosts matched a signature within minutes: ",
                      "the other host was named in an exploit request this host received within minutes: ")
    alerted = {cid for a in scored["_alerts"] for cid in a["evidence_community_ids"]}
    linked = 0
    for name, flows in scored.items():
        if name.startswith("_"):
            continue
        by_cid = {r["community_id"]: r for r in flows if r["community_id"]}
        for r in flows:
            marked = r["verdict"] == "attack" and r["reasons"][0].startswith(marked_reasons)
            if not marked:
                assert r["evidence_community_id"] is None or r["evidence_community_id"] in alerted, r
                continue
            evidence = by_cid[r["evidence_community_id"]]
            assert evidence["verdict"] == "attack" and not evidence["reasons"][0].startswith(marked_reasons)
            assert evidence["reasons"][0].endswith(r["reasons"][0].split(": ", 1)[1]), (r, evidence)
            assert evidence["community_id"] != r["community_id"]
            linked += 1
    assert linked >= 100  # the IRC bot's other flows, the log4j victim's, the SQL injection's


def test_attacks_only_writes_the_attacks_and_counts_every_flow(scored: dict[str, list[dict]]) -> None:
    records = ndjson(run_iotscan("analyze", SAMPLES, "-f", "ndjson", "--no-devices", "--attacks-only",
                                 check_code=0).stdout)
    attacks = {r["flow_id"] for name, flows in scored.items() if not name.startswith("_") for r in flows
               if r["verdict"] == "attack"}
    flows = [r for r in records if r["event_type"] == "flow"]
    assert {r["flow_id"] for r in flows} == attacks and len(flows) == len(attacks)
    summary, everything = records[-1], scored["_summary"][0]
    assert (summary["flows"], summary["attacks"], summary["attack_families"]) == \
        (everything["flows"], everything["attacks"], everything["attack_families"]) and summary["flows"] > len(flows)
    proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "--attacks-only", "--no-score")
    assert proc.returncode == 2 and b"--attacks-only" in proc.stderr
    assert_no_traceback(proc)
    assert len(proc.stderr.decode().strip().splitlines()) == 1


def test_fail_on_no_score_and_threshold() -> None:
    proc = run_iotscan("analyze", SAMPLES / "synflood-spoofed.pcap", "-f", "ndjson", "--no-devices",
                       "--fail-on", "ddos")
    assert proc.returncode == 1, proc.stderr
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-f", "ndjson", "--no-devices",
                       "--no-score", "--fail-on", "attack", check_code=0)
    records = ndjson(proc.stdout)
    assert "verdict" not in records[0] and records[-1]["attacks"] == 0
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-f", "ndjson", "--no-devices",
                       "--threshold", "0", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert flows and all(r["verdict"] == "attack" and r["family"] in FAMILIES for r in flows)
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--threshold", "1.5")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


def test_table_shows_attacks_first_and_csv_has_verdicts(tmp_path: Path) -> None:
    proc = run_iotscan("analyze", SAMPLES / "synflood-spoofed.pcap", "-f", "table", "--no-devices", check_code=0)
    text = proc.stdout.decode()
    assert text.index("Attacks by family") < text.index("Attack flows") < text.index("Busiest flows")
    assert "ddos" in text and "top 20 of" in text
    out = tmp_path / "flows.csv"
    run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--no-devices", "-o", out, check_code=0)
    header = out.read_text().splitlines()[0].split(",")
    assert {"verdict", "score", "family", "reasons"} <= set(header)


def _tampered_install(tmp_path: Path) -> Path:
    """A copy of the source tree whose bundled model file was altered after its card was written."""
    root = tmp_path / "install"
    shutil.copytree(REPO / "iotscan", root / "iotscan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "models", root / "models", ignore=shutil.ignore_patterns("__pycache__"))
    model = root / "models" / "flows.joblib"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return root


def test_tampered_bundled_model_is_refused(tmp_path: Path) -> None:
    root = _tampered_install(tmp_path)
    with pytest.raises(ModelError, match="does not match"):
        load_model(root / "models" / "flows.joblib")
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-f", "ndjson", cwd=root,
                       env={"PYTHONPATH": str(root)})
    assert proc.returncode == 4, proc.stderr
    assert_no_traceback(proc)
    assert b"SHA-256" in proc.stderr and len(proc.stderr.decode().strip().splitlines()) == 1


def test_reasons_do_not_depend_on_how_flows_were_batched() -> None:
    # a file's first batch holds the flows that came before the request pass ended, a matter of timing: alike
    # attacks share reasons among each run of batch_rows flows, counted from the source's start
    from iotscan.capture.source import FlowSource
    from iotscan.cli.common import main_pass_config
    from iotscan.output.records import flow_record
    from iotscan.stage import SourceInfo

    path = SAMPLES / "mirai-c2-irc.pcap"  # 408 flows of a bot, alike but not quite
    config = main_pass_config(str(path), score=True)
    flows = [f for f in FlowSource(config) if f is not None]

    def reasons(cuts: list[int]) -> list[list[str] | None]:
        stage = ScoringStage(batch_rows=64)
        stage.begin(SourceInfo(name=path.name, config=config))
        assert stage._extractor is not None
        out = []
        for start, end in zip([0, *cuts], [*cuts, len(flows)], strict=True):
            batch = [(flow_record(f, str(path), path.name), f) for f in flows[start:end]]
            for _, flow in batch:
                stage._extractor.add(flow)
            out += [record["reasons"] for record, _ in stage._score(batch)]
        return out

    by_64 = reasons(list(range(64, len(flows), 64)))
    # the detector alone (no request findings here) calls about half of them attacks: the others are the bot's
    # failed reconnections to its controller, which it judges as a client's retries (scoring.client_retries)
    assert len(flows) > 300 and sum(r is not None for r in by_64) > 200
    assert reasons([100, 164, 300]) == reasons([37, 250]) == by_64


def test_bundled_model_is_checked_before_the_run_and_unpickled_once_flows_come(tmp_path: Path) -> None:
    """The bundled model is verified (hash, card schema) before any packet is read, but unpickled at the
    first batch, once the meters run."""
    stage = ScoringStage()
    assert stage._model is None and stage.threshold == stage.card["threshold"]
    assert stage.model["feature_names"] == FEATURE_NAMES and stage._model is not None
    root = tmp_path / "install"
    shutil.copytree(REPO / "iotscan", root / "iotscan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "models", root / "models", ignore=shutil.ignore_patterns("__pycache__"))
    card_file = root / "models" / "flows.card.json"
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "feature_schema_version": FEATURE_SCHEMA_VERSION - 1}))
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-f", "ndjson", cwd=root,
                       env={"PYTHONPATH": str(root)})
    assert proc.returncode == 4 and b"feature schema" in proc.stderr and proc.stdout == b""
    assert_no_traceback(proc)


def test_own_model_needs_trust(tmp_path: Path) -> None:
    own = tmp_path / "own.joblib"
    shutil.copy(bundled_model("flows"), own)
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--model", own)
    assert proc.returncode == 4 and b"--trust-model" in proc.stderr
    assert_no_traceback(proc)
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "-f", "ndjson", "--no-devices",
                       "--model", own, "--trust-model", check_code=0)
    assert all("verdict" in r for r in ndjson(proc.stdout)[:-1])


def test_schema_mismatch_is_refused(tmp_path: Path, bundled: tuple[dict, dict]) -> None:
    model, card = bundled
    other = tmp_path / "old-schema.joblib"
    save_model({**model, "feature_schema_version": FEATURE_SCHEMA_VERSION + 100}, other,
               {k: v for k, v in card.items() if k != "sha256"}, "old")
    with pytest.raises(ModelError, match="feature schema"):
        load_model(other, schema_version=FEATURE_SCHEMA_VERSION)
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--model", other, "--trust-model")
    assert proc.returncode == 4 and b"feature schema" in proc.stderr
    assert_no_traceback(proc)
    garbage = tmp_path / "garbage.joblib"
    garbage.write_bytes(b"not a pickle at all")
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", "--model", garbage, "--trust-model")
    assert proc.returncode == 4 and b"cannot load model" in proc.stderr


def test_model_info_prints_the_card() -> None:
    proc = run_iotscan("model", "info", check_code=0)
    text = proc.stdout.decode()
    assert "Leave one source out" in text and "SHA-256 verified" in text
    card = json.loads(run_iotscan("model", "info", "--json", check_code=0).stdout)
    assert card["sha256"] == sha256_file(bundled_model("flows"))


def _table(records: list[dict], width: int) -> str:
    sink = TableSink(io.BytesIO(), width=width)
    for r in records[:-1]:
        sink.write(r)
    sink.close(records[-1])
    return sink.out.getvalue().decode()


def test_table_says_why_per_attack_and_per_family() -> None:
    """The table names each family's flows, distinct sources and targets and most common first reason, and the
    highest-scored attack flows with their first reason (the widths they get: tests/test_table.py)."""
    records = ndjson(run_iotscan("analyze", SAMPLES / "log4j-exploit.pcap", SAMPLES / "synflood-spoofed.pcap",
                                 "-f", "ndjson", "--no-devices", check_code=0).stdout)
    attacks = [r for r in records if r.get("verdict") == "attack"]
    by_family = Counter(r["family"] for r in attacks)
    assert by_family.keys() == {"ddos", "exploit"}
    wide = _table(records, 240)
    rollup = wide[wide.index("Attacks by family"):wide.index("Attack flows")]
    for family, flows in by_family.items():
        rows = [line.split() for line in rollup.splitlines() if line.split()[:1] == [family]]
        assert len(rows) == 1 and rows[0][1] == f"{flows:,}", rollup
        sources = {r["src_ip"] for r in attacks if r["family"] == family}
        targets = {r["dst_ip"] for r in attacks if r["family"] == family}
        assert rows[0][2:4] == [f"{len(sources):,}", f"{len(targets):,}"]
    assert "a flood of one host from many sources (DDoS)" in rollup
    listed = wide[wide.index("Attack flows"):wide.index("Busiest flows")]
    assert " why " in listed.splitlines()[1] and "JNDI" in listed
    # the 20 highest-scored attack flows, each named by a prefix of its id, with its family, score and reason
    ids = [str(r["flow_id"]) for r in records[:-1]]
    rows = [line.split() for line in listed.splitlines()[3:] if line[:1].isdigit()]
    shown = []
    for row in rows:
        (full,) = [i for i in ids if i.startswith(row[0])]
        r = next(a for a in attacks if str(a["flow_id"]) == full)
        assert f"{r['family']} {r['score']:.2f} {r['reasons'][0]}" in " ".join(row)
        shown.append(full)
    assert len(shown) == 20
    assert min(r["score"] for r in attacks if str(r["flow_id"]) in shown) >= \
        max(r["score"] for r in attacks if str(r["flow_id"]) not in shown)


def test_family_tally_caps_distinct_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "DISTINCT_CAP", 3)
    tally = table._FamilyTally()
    for i in range(10):
        tally.add({"src_ip": f"10.0.0.{i}", "dst_ip": "10.0.1.1", "reasons": ["r1" if i % 3 else "r2"]})
    assert tally.flows == 10 and len(tally.sources) == 3 and len(tally.targets) == 1
    text = _render(table.family_table({"ddos": tally}))
    assert "3+" in text and " 1 " in text and "r1" in text and "r2" not in text


def _render(table: object) -> str:
    out = io.StringIO()
    Console(file=out, width=120).print(table)
    return out.getvalue()
