"""Device fingerprinting end to end on real captures: records, evidence, honesty, the model's integrity."""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from conftest import DATASETS, NDPI_PCAPS, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan
from nfstream.flow import UDPS, nf_packet

from iotscan.capture.names import registered_domain
from iotscan.capture.source import MeterConfig
from iotscan.detect.modelstore import bundled_model, read_card, sha256_file
from iotscan.devices import DEVICE_FIELD_NAMES
from iotscan.devices.behaviour import generalise
from iotscan.devices.fingerprint import DeviceModel
from iotscan.devices.identity import (
    IdentityPlugin,
    parse_dhcp,
    parse_edimax_cloud,
    parse_mdns,
    parse_ssdp,
    read_identity,
)
from iotscan.devices.signatures import DEVICE_TYPES, data_path, load_signatures
from iotscan.output.records import DEVICE_RISK_FIELD_NAMES

TPLINK = SAMPLES / "tplink-hs110-setup.pcap"
HUE = SAMPLES / "hue-bridge-setup.pcap"
EDIMAX = SAMPLES / "edimax-sp2101w-setup.pcap"


def devices(*args: str | Path, code: int = 0) -> tuple[list[dict], dict]:
    proc = run_iotscan("devices", *args, "--format", "ndjson")
    assert_no_traceback(proc)
    assert proc.returncode == code, proc.stderr.decode()
    records = ndjson(proc.stdout)
    assert records and records[-1]["event_type"] == "summary"
    found = records[:-1]
    assert all(r["event_type"] == "device" for r in found)
    assert records[-1]["devices"] == len(found)
    return found, records[-1]


def by_mac(records: list[dict]) -> dict[str, dict]:
    return {r["mac"]: r for r in records}


def signals(record: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in record["evidence"]:
        assert set(e) == {"signal", "value", "points_to"} and all(isinstance(v, str) for v in e.values())
        out.setdefault(e["signal"], []).append(e["value"])
    return out


def check_contract(record: dict) -> None:
    assert list(record)[: len(DEVICE_FIELD_NAMES)] == list(DEVICE_FIELD_NAMES)
    assert record["device_type"] in DEVICE_TYPES
    assert 0.0 <= record["confidence"] <= 1.0
    assert record["ips"] and all(isinstance(ip, str) for ip in record["ips"])
    assert record["first_seen_ms"] <= record["last_seen_ms"]
    assert record["flows"] >= 1 and record["bytes"] > 0
    if record["device_type"] == "unknown":
        assert record["model"] is None
        guess = record["type_guess"]
        assert guess is None or (guess["device_type"] in DEVICE_TYPES and 0.0 < guess["confidence"] < 1.0)
    else:
        assert record["type_guess"] is None


def from_source(records: list[dict], source: Path) -> dict[str, dict]:
    return {r["mac"]: r for r in records if str(source) in r["sources"]}


# -- known devices of the samples ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples_run() -> tuple[list[dict], dict]:
    """One run over the samples folder (the devices of every sample, told apart by their sources)."""
    return devices(SAMPLES)


def test_tplink_plug_sample_is_the_hs110_with_its_evidence(samples_run) -> None:
    found, summary = samples_run
    for r in found:
        check_contract(r)
    plug = from_source(found, TPLINK)["50:c7:bf:00:c7:03"]
    assert (plug["vendor"], plug["device_type"], plug["model"]) == ("TP-Link", "smart_plug",
                                                                    "TP-Link HS110 smart plug")
    assert plug["ips"] == ["10.10.10.20"] and plug["confidence"] >= 0.7
    seen = signals(plug)
    assert any(v.lower() == "hs110(eu)" for v in seen["dhcp_hostname"])
    assert "devs.tplinkcloud.com" in seen["server_name"]
    assert seen["mac_vendor"] == ["TP-LINK TECHNOLOGIES CO.,LTD."]
    # The gateway forwards the plug's Internet traffic: a router, owning only its own local address.
    gateway = from_source(found, TPLINK)["00:b5:6d:06:08:ba"]
    assert gateway["device_type"] == "router" and gateway["ips"] == ["10.10.10.1"]
    assert "gateway" in signals(gateway)
    assert summary["errors"] == [] and summary["warnings"] == []


def test_hue_bridge_sample_is_the_bridge_from_upnp_mdns_and_dhcp(samples_run) -> None:
    found = from_source(samples_run[0], HUE)
    bridge = found["00:17:88:24:76:ff"]
    assert (bridge["vendor"], bridge["device_type"], bridge["model"]) == ("Philips", "hub", "Philips Hue bridge")
    seen = signals(bridge)
    assert "hue-bridgeid" in seen["ssdp_header"]  # from the identity pass (SSDP payloads)
    assert "md=BSB002" in seen["mdns_txt"]  # from the identity pass (mDNS TXT)
    assert any("ipbridge" in v.lower() for v in seen["ssdp_server"])
    assert bridge["ips"][0] == "10.10.10.6"
    # The Android phone that set the bridge up is a phone, from its user agent.
    phone = found["38:0b:40:ef:85:41"]
    assert phone["device_type"] == "phone" and "user_agent" in signals(phone)


def test_edimax_plug_sample_names_its_model_from_its_cloud_hello(samples_run) -> None:
    """The SP-2101W and its look-alike SP-1101W share firmware, DHCP and cloud; only the hello the plug sends
    to the Edimax cloud (bit-rotated XML on UDP 8765) names the model."""
    plug = from_source(samples_run[0], EDIMAX)["74:da:38:23:22:7b"]
    assert (plug["vendor"], plug["device_type"], plug["model"]) == ("Edimax", "smart_plug",
                                                                    "Edimax SP-2101W smart plug")
    seen = signals(plug)
    assert set(seen["cloud_model"]) == {"SP-2101W"} and set(seen["cloud_device_type"]) == {"SmartPlug"}
    assert plug["confidence"] >= 0.8


def _payloads(capture: Path, display_filter: str) -> list[bytes]:
    proc = subprocess.run(["tshark", "-r", str(capture), "-Y", display_filter, "-T", "fields", "-e", "udp.payload"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip("tshark is needed to extract payloads")
    return [bytes.fromhex(h) for h in proc.stdout.split() if h]


def test_edimax_cloud_hello_is_decoded_whatever_its_rotation() -> None:
    hellos = _payloads(EDIMAX, "udp.dstport == 8765")
    decoded = [parse_edimax_cloud(p) for p in hellos]
    assert [("cloud_model", "SP-2101W"), ("cloud_device_type", "SmartPlug")] in decoded
    # The same message rotated by every bit count, as the plug varies it: always read alike.
    hello = next(p for p, d in zip(hellos, decoded, strict=True) if d and d[0][0] == "cloud_model")
    for k in range(8):
        rotated = bytes(((b << k) | (b >> (8 - k))) & 0xFF for b in hello)
        assert parse_edimax_cloud(rotated) == [("cloud_model", "SP-2101W"), ("cloud_device_type", "SmartPlug")]
    # Replies of the cloud and other datagrams name nothing; unit ids and addresses are never read.
    assert all(not parse_edimax_cloud(p) for p in _payloads(EDIMAX, "udp.srcport == 8765"))
    assert not any(v for d in decoded for _, v in d if "74DA" in v.upper() or "10.10." in v)
    assert parse_edimax_cloud(b"") == [] and parse_edimax_cloud(b"\xff" * 400) == []


def test_edimax_look_alikes_are_told_apart_on_every_capture() -> None:
    require_shared("datasets", "iot-sentinel")
    for folder, model in (("EdimaxPlug1101W", "Edimax SP-1101W smart plug"),
                          ("EdimaxPlug2101W", "Edimax SP-2101W smart plug")):
        captures = sorted((DATASETS / "iot-sentinel" / folder).glob("*.pcap"))
        mac = (DATASETS / "iot-sentinel" / folder / "_iotdevice-mac.txt").read_text().split()[0].lower()
        found, _ = devices(*captures)
        assert by_mac(found)[mac]["model"] == model, (folder, signals(by_mac(found)[mac]))
        for capture in captures:  # the run pools evidence over its inputs: each capture holds the hello
            hints = read_identity(str(capture), MeterConfig(source=str(capture))).by_mac[mac]
            assert list(hints["cloud_model"]) == [model.split()[1]], capture


def test_an_unremarkable_host_stays_unknown(samples_run) -> None:
    (pi,) = from_source(samples_run[0], SAMPLES / "mirai-c2-irc.pcap").values()
    # A Raspberry Pi talking IRC: nothing says what product it is.
    assert pi["device_type"] == "unknown" and pi["model"] is None and pi["confidence"] < 0.4
    assert pi["vendor"] == "Raspberry Pi"


def test_capture_without_local_devices_yields_no_device_and_no_error() -> None:
    # One-way spoofed SYN flood: public sources, and the local target never answers.
    found, summary = devices(SAMPLES / "synflood-spoofed.pcap")
    assert found == []
    assert summary["errors"] == [] and summary["flows"] > 0


def test_analyze_emits_device_records_before_the_summary_and_links_flows() -> None:
    # --no-score: this test is about the device stage, not about the flow model's verdicts.
    proc = run_iotscan("analyze", TPLINK, HUE, "--no-score", "--format", "ndjson")
    assert proc.returncode == 0, proc.stderr.decode()
    records = ndjson(proc.stdout)
    kinds = [r["event_type"] for r in records]
    assert kinds[-1] == "summary"
    first_device = kinds.index("device")
    assert set(kinds[first_device:-1]) == {"device"}, "device records come after the flows, before the summary"
    device_macs = {r["mac"] for r in records if r["event_type"] == "device"}
    assert records[-1]["devices"] == len(device_macs) == kinds.count("device")
    flows = [r for r in records if r["event_type"] == "flow"]
    linked = {r["src_device"] for r in flows if r["src_device"]} | {r["dst_device"] for r in flows if r["dst_device"]}
    assert "50:c7:bf:00:c7:03" in linked and linked <= device_macs
    for f in flows:
        assert f["src_device"] in (None, f["src_mac"]) and f["dst_device"] in (None, f["dst_mac"])

    bare = ndjson(run_iotscan("analyze", TPLINK, "--no-devices", "--no-score", "--format", "ndjson",
                              check_code=0).stdout)
    assert all(r["event_type"] in ("flow", "summary") for r in bare) and bare[-1]["devices"] == 0
    assert "src_device" not in bare[0]


def _tables(stage) -> dict:
    """A device stage's run tables, every counter of every device, comparable."""
    from iotscan.devices.behaviour import DeviceActivity

    acts = {mac: {slot: getattr(act, slot) for slot in DeviceActivity.__slots__ if slot != "source"}
            for mac, act in stage.devices.items()}
    return {"devices": acts, "order": list(stage.devices), "gateways": stage.gateways}


@pytest.mark.parametrize("data", ["samples cut in halves", "samples cut in thirds", "iot-sentinel D-LinkCam"])
def test_captures_counted_apart_and_merged_equal_one_table(data: str) -> None:
    """The device stage counts each capture in its own tables and merges them in input order (as the parallel
    runner does with captures analysed elsewhere): the merged tables equal those of all the flows counted in one,
    every counter of every device (gaps between a service's flows across captures, unanswered flows to a device
    of an earlier capture). On the samples' flow records cut anywhere, and on the captures of one camera."""
    from iotscan.devices.stage import DeviceStage
    from iotscan.stage import SourceInfo

    path = require_shared("datasets", "iot-sentinel", "D-LinkCam") if "iot-sentinel" in data else SAMPLES
    flows = [r for r in ndjson(run_iotscan("analyze", path, "--no-devices", "--no-score", "-f", "ndjson",
                                           check_code=0).stdout) if r["event_type"] == "flow"]
    if "cut" in data:
        cuts = [0, *(int(len(flows) * c) for c in ((0.5,) if "halves" in data else (0.2, 0.7))), len(flows)]
        parts = [flows[a:b] for a, b in itertools.pairwise(cuts)]
    else:  # capture by capture
        parts = [[r for r in flows if r["source"] == source] for source in dict.fromkeys(r["source"] for r in flows)]
        assert len(parts) >= 10  # one capture of the 16 has no IP flow

    def counted(parts: list[list[dict]]) -> DeviceStage:
        stage = DeviceStage(use_model=False, identity_pass=False)
        for part in parts:
            stage.begin(SourceInfo(name="capture", config=MeterConfig(source="capture")))
            observe = stage.observer()
            for record in part:
                observe(dict(record))
            stage.add_capture_result(stage.capture_result())
        return stage

    whole, merged = counted([flows]), counted(parts)
    assert len(whole.devices) >= 3 and sum(a.flows for a in whole.devices.values()) > 300
    assert _tables(merged) == _tables(whole)


def test_formats_csv_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "devices.csv"
    run_iotscan("devices", TPLINK, "-o", out, check_code=0)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows and list(rows[0]) == [*DEVICE_FIELD_NAMES, *DEVICE_RISK_FIELD_NAMES]  # the risk stage's posture too
    assert {r["mac"] for r in rows} >= {"50:c7:bf:00:c7:03"}
    doc = orjson.loads(run_iotscan("devices", TPLINK, "-f", "json", check_code=0).stdout)
    assert {d["mac"] for d in doc["devices"]} == {r["mac"] for r in rows} and doc["summary"]["devices"] == len(rows)
    table = run_iotscan("devices", TPLINK, "-f", "table", check_code=0).stdout.decode()
    assert "Devices" in table and "smart_plug" in table and "TP-Link HS110 smart plug" in table


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_iotscan("devices", tmp_path / "missing.pcap")
    assert proc.returncode == 2 and proc.stdout.decode().count("\n") <= 1
    assert_no_traceback(proc)
    assert proc.stderr.decode().strip().startswith("iotscan: error:")


# -- the model file ------------------------------------------------------------------------------------


def test_bundled_model_verifies_and_matches_its_card() -> None:
    path = bundled_model("devices")
    card = read_card(path)
    assert card["sha256"] == sha256_file(path)
    model = DeviceModel.load()
    assert len(model.labels) == card["data"]["labels_count"] >= 25
    assert model.labels["TP-Link HS110 smart plug"] == {"vendor": "TP-Link", "device_type": "smart_plug"}
    ev = card["evaluation"]
    assert ev["known_models"]["type_accuracy"] >= 0.98  # measured on captures the model never saw
    assert ev["unseen_unit"]["device"] == "oconnor-lab/blink-cam-02" and ev["unseen_unit"]["units"] > 0
    assert "scikit-learn" in card["versions"] and card["training_command"].startswith("iotscan devices train")
    md = path.with_name("devices.card.md").read_text()
    assert card["sha256"] in md


def test_a_device_model_holding_a_scikit_learn_pipeline_still_loads(tmp_path: Path) -> None:
    # a device model trained before iotscan kept its trees as arrays (a user's own): its DictVectorizer and forest
    # become columns and array trees at load, with the pipeline's probabilities
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.pipeline import make_pipeline

    from iotscan.detect.modelstore import save_model

    bundled = DeviceModel.load()
    rows = [{"port=tcp/80": 0.5, "oui=tp-link": 1.0, "app=DNS": 0.2}, {"port=udp/1900": 1.0, "hostword=hue": 1.0},
            {"port=tcp/80": 0.1, "ua=curl": 1.0, "app=DNS": 0.9}, {"port=udp/1900": 0.4, "oui=signify": 1.0}]
    labels = ["plug", "hub", "plug", "hub"]
    pipeline = make_pipeline(DictVectorizer(sparse=False), RandomForestClassifier(n_estimators=7, random_state=0))
    pipeline.fit(rows, labels)
    legacy = {k: v for k, v in bundled.bundle.items() if k not in ("columns", "forest")}
    path = tmp_path / "legacy-devices.joblib"
    save_model({**legacy, "pipeline": pipeline}, path, {k: v for k, v in bundled.card.items() if k != "sha256"},
               "a legacy device model")
    loaded = DeviceModel.load(path, trusted=True)
    assert "pipeline" not in loaded.bundle and set(loaded.bundle["columns"]) == set(pipeline[0].vocabulary_)
    unseen = [{"port=tcp/80": 0.3, "app=DNS": 0.5, "never=seen": 1.0}, {"oui=signify": 1.0}]
    expected = pipeline.predict_proba(unseen)
    for got, probs in zip(loaded.predict_many(unseen), expected, strict=True):
        assert dict(got) == dict(zip(pipeline.classes_, probs, strict=True))


def test_tampered_model_is_refused_with_exit_4(tmp_path: Path) -> None:
    original = bundled_model("devices")
    copy = tmp_path / "devices.joblib"
    shutil.copy(original, copy)
    shutil.copy(original.with_name("devices.card.json"), tmp_path / "devices.card.json")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    proc = run_iotscan("devices", TPLINK, "--model", copy, "-f", "ndjson")
    assert proc.returncode == 4, proc.stderr.decode()
    assert_no_traceback(proc)
    assert "SHA-256" in proc.stderr.decode() and proc.stdout == b""


# -- signatures and generalisation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["device_signatures.json", "device_types.json"])
def test_signature_files_are_valid_and_free_of_unit_strings(name: str) -> None:
    sigs = load_signatures()
    assert len(sigs.signatures) > 200 and len(sigs.mac_vendors) > 40
    data = json.loads(data_path(name).read_text())
    labs = [row["mac"] for name in ("iot-sentinel", "oconnor-lab") if (DATASETS / name / "devices.csv").exists()
            for row in csv.DictReader((DATASETS / name / "devices.csv").open())]
    text = json.dumps(data["signatures"]).lower()
    for mac in labs:
        hexmac = mac.replace(":", "")
        for tail in (hexmac[6:], hexmac[8:]):
            assert tail not in text, f"signature file contains a lab unit's MAC suffix {tail}"
    for sig in sigs.signatures:
        for t, _ in sig.types:
            assert t in DEVICE_TYPES


def test_names_are_generalised_before_they_become_features() -> None:
    assert generalise("ESP_07AEFB", "5c:cf:7f:07:ae:fb") == "esp_#"
    assert generalise("F4B85EFF2B1B-mysimplelink", "f4:b8:5e:ff:2b:1b") == "#-mysimplelink"
    assert generalise("KEQ0817541") == "keq#"
    assert generalise("Philips hue - 2476FF", "00:17:88:24:76:ff") == "philips hue - #"
    assert generalise("HS110(EU)") == "hs110(eu)" and generalise("DCH-S150") == "dch-s150"
    assert registered_domain("vs-cam.u011.immedia-semi.com") == "immedia-semi.com"
    assert registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert registered_domain("printer.local") is None and registered_domain("239.255.255.250") is None


# -- the identity pass ---------------------------------------------------------------------------------------


def test_identity_pass_reads_dhcp_mdns_and_ssdp_from_real_payloads() -> None:
    hints = read_identity(str(HUE), MeterConfig(source=str(HUE))).by_mac["00:17:88:24:76:ff"]
    assert "Philips-hue" in hints["dhcp_hostname"] and "udhcp 1.19.4" in hints["dhcp_vendor_class"]
    assert "1,3,6,12,15,28,42" in hints["dhcp_fingerprint"]
    assert "_hap._tcp" in hints["mdns_service"] and "md=BSB002" in hints["mdns_txt"]
    assert "/description.xml" in hints["ssdp_location"] and "hue-bridgeid" in hints["ssdp_header"]
    for signal in ("ssdp_usn", "ssdp_nt", "ssdp_st"):  # unit ids are dropped
        assert not any(v.lower().startswith("uuid:") for v in hints.get(signal, {})), hints[signal]


def _udp_packet(payload: bytes, sport: int, dport: int) -> bytes:
    header = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 192, 168, 1, 2, 224, 0, 0, 251])
    return header + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") \
        + b"\0\0" + payload


def _packet(ip: bytes, sport: int, dport: int) -> nf_packet:
    return nf_packet(time=0, delta_time=0, direction=0, raw_size=len(ip) + 14, ip_size=len(ip), transport_size=8,
                     payload_size=len(ip) - 28, src_ip="192.168.1.2", src_mac="02:00:00:00:00:01", src_oui="",
                     dst_ip="224.0.0.251", dst_mac="01:00:5e:00:00:fb", dst_oui="", src_port=sport,
                     dst_port=dport, protocol=17, vlan_id=0, ip_version=4, ip_packet=ip, syn=0, cwr=0, ece=0,
                     urg=0, ack=0, psh=0, rst=0, fin=0, tunnel_id=0)


def test_identity_plugin_never_raises_on_damaged_payloads() -> None:
    """Every prefix and a byte-flipped copy of real DHCP/mDNS/SSDP/Edimax-cloud payloads: the parsers may fail,
    the plugin must not; and the parsers read the intact payloads."""
    payloads = []
    for capture, port in ((TPLINK, 67), (HUE, 5353), (HUE, 1900), (EDIMAX, 8765)):
        proc = subprocess.run(["tshark", "-r", str(capture), "-Y", f"udp.port == {port}", "-T", "fields",
                               "-e", "udp.payload"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip("tshark is needed to extract payloads")
        payloads += [(bytes.fromhex(h), port) for h in proc.stdout.split()[:6] if h]
    assert payloads
    parsed = {67: parse_dhcp, 5353: parse_mdns, 1900: parse_ssdp, 8765: parse_edimax_cloud}
    assert any(parsed[port](p) for p, port in payloads)
    plugin = IdentityPlugin()
    for payload, port in payloads:
        variants = [payload[:n] for n in range(0, len(payload), max(1, len(payload) // 40))]
        variants.append(bytes(b ^ 0x5A if i % 7 == 3 else b for i, b in enumerate(payload)))
        variants.append(payload[:12] + b"\xc0\x0c" * 40)  # a DNS compression-pointer loop
        for data in variants:
            flow = type("Flow", (), {})()
            flow.udps = UDPS()
            plugin.on_init(_packet(_udp_packet(data, port, port), port, port), flow)
            plugin.on_expire(flow)
            assert isinstance(flow.udps.identity, list) and len(flow.udps.identity) <= 48


ODD_CAPTURES = ["dhcp-fuzz.pcapng", "fuzz-2006-06-26-2594.pcap", "fuzz-2006-09-29-28586.pcap",
                "fuzz-2020-02-16-11740.pcap", "fuzz-2021-06-07-c6c72a0a56.pcap", "fuzz-2021-10-13.pcap",
                "kerberos_fuzz.pcapng", "quic-fuzz-overflow.pcapng", "upnp.pcap", "ssdp-m-search-ua.pcap",
                "ssdp-m-search.pcap"]


def test_fuzzed_and_odd_captures_end_cleanly() -> None:
    require_shared("pcaps", "ndpi")
    paths = [p for p in (NDPI_PCAPS / name for name in ODD_CAPTURES) if p.exists()]
    for path in paths:
        read_identity(str(path), MeterConfig(source=str(path)))  # the pass itself never raises on them
    proc = run_iotscan("devices", *paths, "--format", "ndjson")
    assert_no_traceback(proc)
    assert proc.returncode in (0, 2), proc.stderr.decode()
    records = ndjson(proc.stdout)
    summary = records[-1]
    assert summary["event_type"] == "summary" and len(summary["inputs"]) + len(summary["errors"]) >= len(paths)
    assert not [w for w in summary["warnings"] if w["code"] == "identity_pass"]
    for r in records[:-1]:
        check_contract(r)
    upnp = [r for r in records[:-1] if any("upnp" in src or "ssdp" in src for src in r["sources"])]
    assert any(e["signal"].startswith("ssdp_") for r in upnp for e in r["evidence"])


# -- IoT captures of the nDPI corpus ------------------------------------------------------------------------

NDPI_IOT = {
    # capture: (MACs to check or None for all, acceptable types, an evidence signal that must be there)
    "tplink_shp.pcap": (None, {"speaker", "hub", "phone", "smart_plug"}, "app"),
    "tuya_lp.pcap": (None, {"smart_plug", "light"}, "app"),
    "sonos.pcapng": ({"5c:aa:fd:02:92:1a"}, {"speaker"}, "mac_vendor"),
    "alexa-app.pcapng": ({"78:f8:82:d3:fb:c2"}, {"phone"}, "user_agent"),
    "xiaomi.pcap": ({"60:38:e0:c5:35:a0"}, {"phone"}, "user_agent"),
    "nest_log_sink.pcap": ({"18:b4:30:26:34:40"}, {"thermostat"}, "app"),
}


@pytest.fixture(scope="module")
def ndpi_iot_run() -> list[dict]:
    require_shared("pcaps", "ndpi")
    return devices(*(NDPI_PCAPS / name for name in sorted(NDPI_IOT)))[0]


@pytest.mark.parametrize("name", sorted(NDPI_IOT))
def test_ndpi_iot_captures_get_a_sensible_type_with_evidence(ndpi_iot_run, name: str) -> None:
    macs, types, signal = NDPI_IOT[name]
    found = from_source(ndpi_iot_run, NDPI_PCAPS / name)
    chosen = [r for r in found.values() if macs is None or r["mac"] in macs]
    assert chosen and (macs is None or {r["mac"] for r in chosen} == macs)
    for r in chosen:
        check_contract(r)
        assert r["device_type"] in types, (r["mac"], r["device_type"], r["evidence"])
        assert signal in signals(r), r["evidence"]


def test_sonos_capture_tells_the_speaker_from_the_controller(ndpi_iot_run) -> None:
    found = from_source(ndpi_iot_run, NDPI_PCAPS / "sonos.pcapng")
    speaker = [r for r in found.values() if "192.168.1.70" in r["ips"]]
    assert speaker and speaker[0]["device_type"] == "speaker"  # it serves the Sonos protocol on 1443
    assert found["9c:58:3c:a7:ee:cc"]["device_type"] != "speaker"  # the Apple device running the app


def test_oconnor_unit_of_a_known_model_is_recognised() -> None:
    path = require_shared("datasets", "oconnor-lab", "blink-cam-02.pcap")
    cam = by_mac(devices(path)[0])["f4:b8:5e:35:67:b0"]
    assert (cam["device_type"], cam["model"], cam["vendor"]) == ("camera", "Blink Indoor camera", "Blink")
    assert cam["ips"] == ["192.168.1.130"]


def test_lookalike_models_are_not_named_from_behaviour_alone() -> None:
    """iKettle 2.0 and SmarterCoffee setup captures are identical but for MAC and IP: no model, the right type."""
    path = next(iter(sorted(require_shared("datasets", "iot-sentinel", "iKettle2").glob("*.pcap"))))
    kettle = by_mac(devices(path)[0])["5c:cf:7f:06:d9:02"]
    assert kettle["device_type"] == "appliance" and kettle["vendor"] == "Smarter" and kettle["model"] is None
    assert "ambiguous_model" in signals(kettle)


def test_training_command_is_reproducible_and_writes_a_verifiable_model(tmp_path: Path) -> None:
    """`iotscan devices train` on a small slice of the datasets: evaluation by capture, card, same bytes twice."""
    sentinel = require_shared("datasets", "iot-sentinel")
    oconnor = require_shared("datasets", "oconnor-lab")
    data = tmp_path / "data"
    (data / "iot-sentinel").mkdir(parents=True)
    (data / "oconnor-lab").mkdir()
    rows = [r for r in csv.DictReader((sentinel / "devices.csv").open())
            if r["folder"] in ("TP-LinkPlugHS100", "TP-LinkPlugHS110")]
    with (data / "iot-sentinel" / "devices.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        for r in rows:
            (data / "iot-sentinel" / r["folder"]).symlink_to(sentinel / r["folder"])
    with (oconnor / "devices.csv").open() as src, (data / "oconnor-lab" / "devices.csv").open("w") as dst:
        lines = src.read().splitlines()
        dst.write("\n".join([lines[0]] + [x for x in lines[1:] if x.startswith("blink-cam-02")]) + "\n")
    (data / "oconnor-lab" / "blink-cam-02.pcap").symlink_to(oconnor / "blink-cam-02.pcap")

    out = tmp_path / "a" / "devices.joblib"
    run_iotscan("devices", "train", "--data", data, "--out", out, "--folds", "3", "--window-hours", "24",
                timeout=600, check_code=0)
    card = json.loads(out.with_name("devices.card.json").read_text())
    assert card["sha256"] == sha256_file(out)
    assert card["data"]["labels_count"] == 3
    known = card["evaluation"]["known_models"]
    assert known["units"] == 30 and known["type_accuracy"] >= 0.95  # the 30 TP-Link captures
    assert {r["device"] for r in card["evaluation"]["per_device"]} >= {"iot-sentinel/TP-LinkPlugHS110"}
    unseen = card["evaluation"]["leave_one_model_out"]  # each of the 3 models left out in turn
    assert (unseen["models"], unseen["units"]) == (3, known["units"] + card["data"]["units_per_device"][
        "oconnor-lab/blink-cam-02"])
    assert {r["device"] for r in unseen["per_device"]} == {"iot-sentinel/TP-LinkPlugHS100",
                                                           "iot-sentinel/TP-LinkPlugHS110", "oconnor-lab/blink-cam-02"}
    assert "## Devices of models it was not trained on" in out.with_name("devices.card.md").read_text()
    again = tmp_path / "b" / "devices.joblib"
    run_iotscan("devices", "train", "--data", data, "--out", again, "--window-hours", "24", "--skip-eval",
                timeout=600, check_code=0)
    assert sha256_file(again) == card["sha256"], "the same data and seed must give the same model file"
    found, _ = devices(TPLINK, "--model", again)
    assert by_mac(found)["50:c7:bf:00:c7:03"]["model"] == "TP-Link HS110 smart plug"
