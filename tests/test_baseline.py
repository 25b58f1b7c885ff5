"""Device baselines: learn, score, alert; the file (round trip, bad fields, incremental learning); MUD export
validated against RFC 8520's YANG modules and MUD files as baselines; the density models; live --learn on lo.

The captures are the lab's infection scenarios (tests/data/baseline/README.md): a normal-only run of LAN 1,
and another run of the same LAN whose camera is compromised after a normal phase."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import sysconfig
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iotscan.output.records import iso_timestamp
from tests.conftest import REPO, assert_no_traceback, ndjson, run_iotscan

DATA = REPO / "tests" / "data" / "baseline"
NORMAL = DATA / "infection-normal.pcap"
INFECTED = DATA / "infection-mirai.pcap"
THRESHOLD = 0.75


def _phases() -> list[dict[str, str]]:
    with open(DATA / "infection-mirai.phases.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "site.baseline.json"
    run_iotscan("baseline", "learn", NORMAL, "-o", path, check_code=0)
    return path


@pytest.fixture(scope="module")
def scored(learnt: Path) -> list[dict[str, Any]]:
    proc = run_iotscan("analyze", INFECTED, "--baseline", learnt, "-f", "ndjson", "--fail-on", "anomaly")
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]  # --fail-on anomaly: the compromise is found
    assert_no_traceback(proc)
    return ndjson(proc.stdout)


def test_learnt_file_is_plain_versioned_json_with_its_span(learnt: Path) -> None:
    doc = json.loads(learnt.read_text())
    assert doc["format"] == "iotscan-baseline" and doc["version"] == 1
    assert doc["span"]["first_seen"] < doc["span"]["last_seen"] and doc["span"]["days"] > 0
    camera = _phases()[0]["host_mac"]
    profile = doc["devices"][camera]
    # the camera calls its cloud by name (DNS answers name the address), serves its panel and CoAP to the LAN
    assert "ota.camera-cloud.net" in profile["remote"]
    assert profile["remote"]["ota.camera-cloud.net"]["by"] == "name"
    served = {s for p in profile["local"].values() for s in p["in"]}
    assert {"tcp/80", "udp/5683"} <= served
    assert len(profile["hours"]) == 24 and sum(profile["hours"]) == profile["flows"]
    assert profile["windows"]["count"] >= 1 and all(len(row) == 9 for row in profile["windows"]["sample"])
    assert profile["model"]["kind"] in ("envelope", "gauss")
    assert b"\x80" not in learnt.read_bytes()  # no pickle anywhere: the whole file is JSON text


def test_baseline_flags_every_phase_of_the_compromise_with_reasons(scored: list[dict[str, Any]]) -> None:
    phases = _phases()
    camera = phases[0]["host_mac"]
    attack_start = int(phases[1]["start_ms"])
    flows = [r for r in scored if r["event_type"] == "flow"]
    with open(DATA / "infection-mirai.rules.csv", newline="") as f:
        rules = list(csv.DictReader(f))

    def family(r: dict[str, Any]) -> str | None:
        for rule in rules:
            if all(not rule[k] or str(r[k]) == rule[k] for k in ("src_ip", "dst_ip", "protocol", "dst_port")):
                return rule["family"]
        return None

    flagged: dict[str, int] = {}
    for r in flows:
        fam = family(r)
        if fam and camera in (r.get("src_device"), r.get("dst_device")) and r["anomaly"] >= THRESHOLD:
            flagged[fam] = flagged.get(fam, 0) + 1
            assert r["anomaly_reasons"], r
    assert set(flagged) >= {"bruteforce", "c2", "scan", "ddos"}, flagged
    # the loader (the camera's wget of the bot, by address, from a host it never contacted) is flagged on its own
    loader = next(p for p in phases if p["phase"] == "loader")
    server = loader["note"].split("//", 1)[1].split("/", 1)[0]
    fetch = [r for r in flows if r.get("src_device") == camera and r["dst_ip"] == server and r["dst_port"] == 80]
    assert fetch and all(r["anomaly"] >= THRESHOLD for r in fetch), fetch
    assert any("first contact with" in r["anomaly_reasons"][0] for r in fetch)
    # the reasons say what departs: the telnet guessing is the first contact on a port it never served
    brute = [r for r in flows if r["dst_port"] == 23 and r.get("dst_device") == camera and r["anomaly"] >= THRESHOLD]
    assert any("first contact from" in r["anomaly_reasons"][0] and "a port it never served" in r["anomaly_reasons"][0]
               for r in brute)
    assert any("never seen in" in r["anomaly_reasons"][0] for r in brute)
    # the compromise is an alert about the camera within seconds of the first malicious flow
    alerts = [r for r in scored if r["event_type"] == "alert" and r["kind"] == "anomaly"]
    camera_alerts = [a for a in alerts if a["host_mac"] == camera and a["decided_ms"] >= attack_start]
    assert camera_alerts and camera_alerts[0]["decided_ms"] - attack_start < 60_000
    assert camera_alerts[0]["family"] is None and camera_alerts[0]["reasons"]
    # before the attack, nothing of any device is an alert
    assert not [a for a in alerts if a["decided_ms"] < attack_start], alerts
    normal = [r for r in flows if r["last_seen_ms"] < attack_start and r["anomaly"] is not None]
    assert normal and sum(r["anomaly"] >= THRESHOLD for r in normal) == 0
    summary = scored[-1]
    assert summary["baseline"]["anomalous_flows"] > 0 and summary["alert_kinds"].get("anomaly", 0) >= 1
    # the hosts the scan woke up were never in the baseline: each is a new device, once
    new = [a for a in scored if a["event_type"] == "alert" and a["kind"] == "new_device"]
    assert new and len({a["host_mac"] for a in new}) == len(new)


def test_flow_fields_are_in_csv_columns(learnt: Path, tmp_path: Path) -> None:
    out = tmp_path / "flows.csv"
    run_iotscan("analyze", NORMAL, "--baseline", learnt, "-o", out, "--no-score", check_code=0)
    header = out.read_text().splitlines()[0].split(",")
    assert header[-2:] == ["anomaly", "anomaly_reasons"]


def test_bad_or_edited_baseline_is_a_one_line_error(learnt: Path, tmp_path: Path) -> None:
    doc = json.loads(learnt.read_text())
    mac = next(iter(doc["devices"]))
    cases = {
        "flows": (lambda d: d["devices"][mac].__setitem__("flows", "many"), f"devices['{mac}'].flows"),
        "count": (lambda d: d["devices"][mac]["dns"].__setitem__("x.com", -1), "dns['x.com']"),
        "hours": (lambda d: d["devices"][mac].__setitem__("hours", [1, 2]), "hours"),
        "time": (lambda d: d["devices"][mac].__setitem__("first_seen", "yesterday"), "first_seen"),
        "version": (lambda d: d.__setitem__("version", 99), "version"),
    }
    for name, (edit, where) in cases.items():
        bad = json.loads(json.dumps(doc))
        edit(bad)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        for command in (["analyze", NORMAL, "--baseline", path], ["baseline", "show", path]):
            proc = run_iotscan(*command)
            err = proc.stderr.decode().strip()
            assert proc.returncode == 2, (name, err)
            assert len(err.splitlines()) == 1 and where in err and str(path) in err, err
            assert_no_traceback(proc)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    proc = run_iotscan("analyze", NORMAL, "--baseline", garbage)
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr.decode()
    # and learning over a bad file refuses rather than replacing it
    before = garbage.read_bytes()
    assert run_iotscan("baseline", "learn", NORMAL, "-o", garbage).returncode == 2
    assert garbage.read_bytes() == before


def test_learning_again_updates_the_baseline(learnt: Path, tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    shutil.copy(learnt, path)
    first = json.loads(path.read_text())
    proc = run_iotscan("baseline", "learn", INFECTED, "-o", path, check_code=0)
    assert b"updated" in proc.stderr or proc.stderr == b""
    second = json.loads(path.read_text())
    assert second["span"]["first_seen"] == first["span"]["first_seen"]
    assert second["span"]["last_seen"] > first["span"]["last_seen"]
    assert set(first["devices"]) < set(second["devices"])  # the hosts the scan woke up
    assert len(second["sources"]) == 2
    for mac, old in first["devices"].items():
        assert second["devices"][mac]["flows"] > old["flows"]
        assert sum(second["devices"][mac]["hours"]) == second["devices"][mac]["flows"]
    # what was learnt from the attack is in: the compromised camera's controller is now a known peer
    camera = _phases()[0]["host_mac"]
    assert len(second["devices"][camera]["remote"]) > len(first["devices"][camera]["remote"])
    fresh = tmp_path / "fresh.json"
    shutil.copy(learnt, fresh)
    run_iotscan("baseline", "learn", NORMAL, "-o", fresh, "--fresh", check_code=0)
    assert json.loads(fresh.read_text())["devices"].keys() == first["devices"].keys()


# -- MUD ---------------------------------------------------------------------------------------------------------

_MUD_MODULES = (("ietf-mud", "2019-01-28"), ("ietf-access-control-list", "2019-03-04"), ("ietf-acldns", "2019-01-28"),
                ("ietf-packet-fields", "2019-03-04"), ("ietf-ethertypes", "2019-03-04"),
                ("ietf-inet-types", "2013-07-15"), ("ietf-yang-types", "2013-07-15"),
                ("ietf-interfaces", "2018-02-20"))
_ACL_FEATURES = ["match-on-eth", "match-on-ipv4", "match-on-ipv6", "match-on-tcp", "match-on-udp", "match-on-icmp",
                 "eth", "ipv4", "ipv6", "mixed-eth-ipv4", "mixed-eth-ipv6", "mixed-eth-ipv4-ipv6"]


def _mud_model(tmp: Path) -> Any:
    """RFC 8520's data model (with RFC 8519's ACLs), from the YANG modules pyang installs, for yangson."""
    yangson = pytest.importorskip("yangson", reason="yangson validates the MUD files (the test extra)")
    ietf = Path(sysconfig.get_paths()["data"]) / "share" / "yang" / "modules" / "ietf"
    if not (ietf / "ietf-mud.yang").exists():
        pytest.skip(f"{ietf} has no ietf-mud.yang: install pyang (the test extra)")
    implemented = {"ietf-mud", "ietf-access-control-list", "ietf-acldns", "ietf-interfaces"}
    modules = []
    for name, revision in _MUD_MODULES:
        shutil.copy(ietf / f"{name}.yang", tmp / f"{name}@{revision}.yang")
        entry = {"name": name, "revision": revision, "namespace": f"urn:ietf:params:xml:ns:yang:{name}",
                 "conformance-type": "implement" if name in implemented else "import"}
        if name == "ietf-access-control-list":
            entry["feature"] = _ACL_FEATURES
        modules.append(entry)
    library = {"ietf-yang-library:modules-state": {"module-set-id": "mud", "module": modules}}
    return yangson.DataModel(json.dumps(library), [str(tmp)])


def _validate(model: Any, doc: dict[str, Any]) -> None:
    from yangson.enumerations import ContentType, ValidationScope

    model.from_raw(doc).validate(ValidationScope.all, ContentType.config)


def test_export_mud_is_valid_rfc8520_and_reads_back_as_a_baseline(learnt: Path, tmp_path: Path) -> None:
    model = _mud_model(tmp_path)
    out = tmp_path / "mud"
    run_iotscan("baseline", "export-mud", learnt, "-o", out, check_code=0)
    doc = json.loads(learnt.read_text())
    files = sorted(out.glob("*.mud.json"))
    assert len(files) == len(doc["devices"])
    for path in files:
        mud = json.loads(path.read_text())
        _validate(model, mud)
        names = {a["name"] for a in mud["ietf-access-control-list:acls"]["acl"]}
        policy = mud["ietf-mud:mud"]
        for direction in ("from-device-policy", "to-device-policy"):
            assert {a["name"] for a in policy[direction]["access-lists"]["access-list"]} <= names
    # the check catches what the model forbids: a validity above 168 hours, an ACE without its name
    from yangson.exceptions import YangsonException

    camera = _phases()[0]["host_mac"]
    mud = json.loads((out / f"{camera.replace(':', '-')}.mud.json").read_text())
    bad = json.loads(json.dumps(mud))
    bad["ietf-mud:mud"]["cache-validity"] = 500
    with pytest.raises(YangsonException):
        _validate(model, bad)
    bad = json.loads(json.dumps(mud))
    del bad["ietf-access-control-list:acls"]["acl"][0]["aces"]["ace"][0]["name"]
    with pytest.raises((YangsonException, KeyError)):
        _validate(model, bad)
    # the camera's MUD file as its baseline: the normal run is allowed, the compromise is not, ACL named
    mud_file = out / f"{camera.replace(':', '-')}.mud.json"
    proc = run_iotscan("analyze", NORMAL, "--baseline", f"{camera}={mud_file}", "-f", "ndjson", "--no-score",
                       check_code=0)
    camera_flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"
                    and camera in (r.get("src_device"), r.get("dst_device"))]
    assert camera_flows and all(r["anomaly"] == 0 for r in camera_flows), \
        [r["anomaly_reasons"] for r in camera_flows if r["anomaly"]][:3]
    proc = run_iotscan("analyze", INFECTED, "--baseline", mud_file, "-f", "ndjson", "--no-score", check_code=0)
    records = ndjson(proc.stdout)
    telnet = [r for r in records if r["event_type"] == "flow" and r.get("dst_device") == camera
              and r["dst_port"] == 23]
    assert telnet and all(r["anomaly"] >= THRESHOLD for r in telnet)
    assert f"ACL to-ipv4-{camera.replace(':', '')}" in telnet[0]["anomaly_reasons"][0]
    assert any(a["kind"] == "anomaly" and a["detail"] == "mud" for a in records if a["event_type"] == "alert")


def test_a_mud_file_needs_its_device(tmp_path: Path, learnt: Path) -> None:
    out = tmp_path / "mud"
    run_iotscan("baseline", "export-mud", learnt, "-o", out, check_code=0)
    anonymous = tmp_path / "vendor.json"
    shutil.copy(next(out.glob("*.mud.json")), anonymous)
    proc = run_iotscan("analyze", NORMAL, "--baseline", anonymous)
    assert proc.returncode == 2 and "MAC=FILE" in proc.stderr.decode()


# -- the density models ------------------------------------------------------------------------------------------


def test_isolation_forest_kept_as_arrays_scores_as_scikit_learn() -> None:
    from sklearn.ensemble import IsolationForest

    from iotscan.detect.density import IFOREST_SAMPLES, IFOREST_TREES, Density, features, fit_model

    rng = np.random.default_rng(3)
    rows = rng.poisson([3, 1, 2, 2, 0.2, 1, 30, 4000, 9000], size=(300, 9)).tolist()
    model = fit_model(rows, "iforest", seed=5)
    json.dumps(model)  # plain numbers
    forest = IsolationForest(n_estimators=IFOREST_TREES, max_samples=IFOREST_SAMPLES, random_state=5)
    forest.fit(features(rows))
    probe = features([*rng.poisson([3, 1, 2, 2, 0.2, 1, 30, 4000, 9000], size=(50, 9)).tolist(), [300] * 9])
    ours = Density(model).scores(probe)
    np.testing.assert_allclose(ours, -forest.score_samples(probe), rtol=1e-5)


def test_density_weight_grows_with_the_departure() -> None:
    from iotscan.detect.density import Density, fit_model

    rng = np.random.default_rng(1)
    rows = rng.poisson([3, 1, 2, 2, 0.2, 1, 30, 4000, 9000], size=(400, 9)).tolist()
    density = Density(fit_model(rows, "gauss"))
    usual = [3, 1, 2, 2, 0, 1, 30, 4000, 9000]
    assert density.weight(usual) == 0.0
    scan = [300, 1, 290, 2, 280, 1, 600, 40_000, 9000]
    # as rare as 400 learnt minutes can vouch for (1 in 400 x 100), and no rarer
    assert density.weight(scan) == pytest.approx(0.9 * (math.log10(400) + 2 - 3) / 3)
    assert 0 < density.weight([15, 1, 12, 6, 4, 1, 100, 12000, 9000]) < density.weight(scan)
    reason, feature = density.reason(scan)
    assert feature == "unanswered_out" and "in one minute; baseline p99 is" in reason


# -- live: learn, then watch -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.root
@pytest.mark.slow
def test_live_learns_then_watches_on_loopback(tmp_path: Path) -> None:
    """`live lo --learn 3`: three seconds of learning, then watching, the baseline saved at the end. Loopback has
    no devices (its MAC is all zeros), so this checks the phases, the saved file and the records, with traffic on
    this test's own port only."""
    if os.geteuid() != 0:
        pytest.skip("live capture needs root")
    port = _free_port()
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen()
    stop = threading.Event()

    def talk() -> None:
        for _ in range(90):  # bounded: a connection every 0.2 s for at most 18 s
            if stop.wait(0.2):
                return
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                conn, _ = server.accept()
                c.sendall(b"ping")
                conn.recv(16)
                conn.close()

    saved = tmp_path / "live.baseline.json"
    thread = threading.Thread(target=talk, daemon=True)
    thread.start()
    try:
        proc = run_iotscan("live", "lo", "--learn", "6", "--save-baseline", saved, "--duration", "16", "--bpf",
                           f"tcp port {port}", "--idle-timeout", "1", "-f", "ndjson", timeout=120)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    records = ndjson(proc.stdout)
    summary = records[-1]
    assert summary["event_type"] == "summary" and summary["baseline"]["learning"] == "done"
    flows = [r for r in records if r["event_type"] == "flow"]
    assert flows and all(r["dst_port"] == port or r["src_port"] == port for r in flows)
    doc = json.loads(saved.read_text())
    assert doc["format"] == "iotscan-baseline" and doc["devices"] == {}  # loopback: no device
    assert doc["sources"] == ["lo"]
    learnt_from = doc["span"]
    first = min(r["first_seen_ms"] for r in flows)
    # the span learnt from: the flows of the first seconds, not the whole run
    assert iso_timestamp(first) <= learnt_from["first_seen"] < learnt_from["last_seen"]
    assert learnt_from["last_seen"] < iso_timestamp(max(r["last_seen_ms"] for r in flows))


def test_drift_admits_new_things_slowly() -> None:
    """What drift may teach a profile: a new peer only once it came back over 10 minutes, 4 a day at most; what
    it knew is counted up."""
    from iotscan.detect.drift import NEW_PER_DAY, Budget, capped

    def peer(flows: int, minutes: float) -> dict[str, Any]:
        first = 1_700_000_000_000
        return {"out": {"tcp/443": flows}, "in": {}, "apps": {"TLS": flows}, "first_seen": iso_timestamp(first),
                "last_seen": iso_timestamp(first + int(minutes * 60_000)), "by": "name"}

    old = {"remote": {"known.example.com": peer(100, 600)}, "local": {}, "dns": {"example.com": 5}}
    new = {"remote": {"known.example.com": peer(10, 30), "brief.example.net": peer(50, 2),
                      **{f"new{i}.example.org": peer(5, 20) for i in range(6)}},
           "local": {}, "dns": {"example.com": 1, "evil.example": 3}}
    budget = Budget(0)
    allowed, kept = capped(old, new, budget)
    assert "known.example.com" in allowed["remote"]  # counted up
    assert "brief.example.net" not in allowed["remote"]  # seen for 2 minutes only
    assert kept == NEW_PER_DAY == sum(k.startswith("new") for k in allowed["remote"])  # 4 of the 6 settled ones
    assert allowed["dns"] == {"example.com": 1}
    budget.refill(86_400_000 // 2)  # half a day later: two more
    assert capped(old, new, budget)[1] == 2
