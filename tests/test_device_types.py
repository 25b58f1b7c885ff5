"""The type of a device whose model iotscan was not trained on: the generic evidence (what the MAC's maker makes,
product words in names, services, HomeKit categories, UPnP device types), type_guess for weak or contradictory
evidence, the user's own signatures (--signatures FILE), and the leave-one-model-out evaluation."""

from __future__ import annotations

import csv
import json
import re
import struct
from pathlib import Path

import pytest
from conftest import DATASETS, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan

from iotscan.devices.fingerprint import fingerprint
from iotscan.devices.signatures import (
    DEVICE_TYPES,
    SignatureError,
    data_path,
    load_signatures,
    parse_signatures,
    read_signature_file,
    word_text,
)

TYPES_FILE = data_path("device_types.json")
PRODUCTS_FILE = data_path("device_signatures.json")


def dataset_models() -> dict[str, str]:
    """Model -> device type of every labelled device in ../shared (empty without it)."""
    found = {}
    for name in ("iot-sentinel", "oconnor-lab"):
        path = DATASETS / name / "devices.csv"
        if path.exists():
            found.update({row["model"]: row["device_type"] for row in csv.DictReader(path.open())})
    return found


# -- the data ----------------------------------------------------------------------------------------------


def test_every_entry_cites_its_source_and_type_entries_name_no_product() -> None:
    models = dataset_models()
    for path in (TYPES_FILE, PRODUCTS_FILE):
        data = json.loads(path.read_text())
        for entry in data.get("signatures", []) + data.get("mac_vendors", []):
            assert isinstance(entry.get("source"), str) and len(entry["source"]) > 20, entry
            for model in entry.get("models", []):
                assert not models or model in models, f"{path.name}: unknown model {model!r} in {entry}"
    generic = json.loads(TYPES_FILE.read_text())
    codes = {c.lower() for m in models for c in re.findall(r"[A-Za-z]+-?\d[\w-]*", m)}  # DCS-935L, HS100, WS-30
    for entry in generic["signatures"]:
        assert "model" not in entry, entry  # generic evidence names a type, never a product
        pattern = " ".join(str(entry.get(k, "")) for k in ("regex", "equals", "domain", "words")).lower()
        if not entry.get("models"):  # written from other sources: it must not spell a labelled model's code
            assert not [c for c in codes if c in pattern or word_text(c) in pattern], entry


def test_names_are_read_as_words() -> None:
    assert word_text("IPCamDesc.xml") == "ip cam desc xml"
    assert word_text("IoTHub") == "io t hub"
    assert word_text("vs-cam.u011.immedia-semi.com") == "vs cam u 011 immedia semi com"
    sigs = load_signatures()

    def types(signal: str, value: str) -> set[str]:
        return {t for m in sigs.match({signal: [value]}) for t, _ in m.types}

    assert "camera" in types("ssdp_location", "/IPCamDesc.xml")
    assert "camera" in types("mdns_host", "localcam")
    assert "hub" in types("dhcp_hostname", "IoTHub")
    assert "smart_plug" in types("cloud_device_type", "SmartPlug")
    assert "thermostat" in types("server_name", "api.sensicomfort.com")
    assert "lock" not in types("server_name", "clock.isc.org")  # a word, not a substring
    assert "smart_plug" not in types("dhcp_hostname", "plugin-host")
    assert "camera" not in types("mdns_host", "camping-van")


def test_leaving_a_model_out_leaves_out_every_entry_written_with_it() -> None:
    sigs = load_signatures()
    model = "TP-Link HS110 smart plug"
    assert sigs.naming(model)  # the product signatures written with its captures visible
    without = sigs.without(model)
    assert without.naming(model) == []
    assert len(without.signatures) < len(sigs.signatures)
    # what stays is generic: the Kasa HS code family and the Kasa cloud still say "a plug"
    matches = without.match({"dhcp_hostname": ["HS110(EU)"], "server_name": ["devs.tplinkcloud.com"]})
    assert matches and all(m.model is None for m in matches)
    assert {t for m in matches for t, _ in m.types} >= {"smart_plug"}


# -- a crafted capture: one device per kind of evidence -----------------------------------------------------

GATEWAY = bytes.fromhex("02aabbccdd01")


def _frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(map(int, src_ip.split("."))),
                     bytes(map(int, dst_ip.split(".")))) + udp
    return dst_mac + src_mac + b"\x08\x00" + ip


def _name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def _mdns(records: list[tuple[str, int, bytes]]) -> bytes:
    """An mDNS response: (name, type, rdata) answers."""
    body = b"".join(_name(n) + struct.pack("!HHIH", t, 1, 120, len(rdata)) + rdata for n, t, rdata in records)
    return struct.pack("!HHHHHH", 0, 0x8400, 0, len(records), 0, 0) + body


def _service(service: str, instance: str, txt: tuple[str, ...] = ()) -> list[tuple[str, int, bytes]]:
    full = f"{instance}.{service}.local"
    records = [(f"{service}.local", 12, _name(full))]
    if txt:
        records.append((full, 16, b"".join(bytes([len(t)]) + t.encode() for t in txt)))
    return records


def _dhcp_request(mac: bytes, hostname: str) -> bytes:
    fixed = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0x1234, 0, 0) + bytes(16) + mac + bytes(10 + 64 + 128)
    options = bytes([53, 1, 3, 12, len(hostname)]) + hostname.encode() + bytes([55, 4, 1, 3, 6, 15, 255])
    return fixed + b"\x63\x82\x53\x63" + options


def _dns_query(name: str) -> bytes:
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + _name(name) + struct.pack("!HH", 1, 1)


MDNS_MAC = bytes.fromhex("01005e0000fb")
SSDP_MAC = bytes.fromhex("01005e7ffffa")
DEVICES = {  # MAC: (address, frames it sends, what it must be)
    "44:61:32:00:00:0a": ("192.168.7.10", "ntp", "thermostat"),  # ecobee's OUI, nothing else
    "02:00:00:00:00:0b": ("192.168.7.11", "hap", "thermostat"),  # HomeKit ci=9
    "02:00:00:00:00:0c": ("192.168.7.12", "upnp", "camera"),  # UPnP DigitalSecurityCamera
    "02:00:00:00:00:0d": ("192.168.7.13", "sensi", "thermostat"),  # resolves a Sensi thermostat name
    "02:00:00:00:00:0e": ("192.168.7.14", "mixed", "unknown"),  # names itself a camera and a lock
    "d4:8a:fc:00:00:0f": ("192.168.7.15", "ntp", "unknown"),  # Espressif (a module maker), nothing else
    "02:00:00:00:00:10": ("192.168.7.16", "rtsp", "camera"),  # offers _rtsp._tcp
    "02:00:00:00:00:11": ("192.168.7.17", "frontdoor", "unknown"),  # named by the user's own signature only
}


def _frames_of(mac: str, ip: str, kind: str) -> list[bytes]:
    src = bytes.fromhex(mac.replace(":", ""))
    if kind == "ntp":
        return [_frame(src, GATEWAY, ip, "203.0.113.5", 40123, 123, b"\x23" + bytes(47))]
    if kind == "hap":
        return [_frame(src, MDNS_MAC, ip, "224.0.0.251", 5353, 5353, _mdns(_service("_hap._tcp", "Hallway", (
            "c#=2", "md=T9", "ci=9"))))]
    if kind == "upnp":
        notify = (b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: urn:schemas-upnp-org:device:"
                  b"DigitalSecurityCamera:1\r\nNTS: ssdp:alive\r\nSERVER: Linux/4.9 UPnP/1.0 x/1.0\r\nUSN: uuid:"
                  b"5a1e-0001::urn:schemas-upnp-org:device:DigitalSecurityCamera:1\r\n\r\n")
        return [_frame(src, SSDP_MAC, ip, "239.255.255.250", 1900, 1900, notify)]
    if kind == "sensi":
        return [_frame(src, GATEWAY, ip, "192.168.7.1", 40124, 53, _dns_query("api.sensicomfort.com"))]
    if kind == "mixed":
        return [_frame(src, MDNS_MAC, ip, "224.0.0.251", 5353, 5353,
                       _mdns(_service("_http._tcp", "Front Cam") + _service("_http._tcp", "Door Lock")))]
    if kind == "rtsp":
        return [_frame(src, MDNS_MAC, ip, "224.0.0.251", 5353, 5353, _mdns(_service("_rtsp._tcp", "Unit 7")))]
    if kind == "frontdoor":
        return [_frame(src, bytes(6 * [255]), "0.0.0.0", "255.255.255.255", 68, 67, _dhcp_request(src, "frontdoor-7")),
                _frame(src, GATEWAY, ip, "203.0.113.5", 40125, 123, b"\x23" + bytes(47))]
    raise ValueError(kind)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = [f for mac, (ip, kind, _) in DEVICES.items() for f in _frames_of(mac, ip, kind)]
    path = tmp_path_factory.mktemp("types") / "crafted-devices.pcap"
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(frames):
            out.write(struct.pack("<IIII", 1_700_000_000, i * 1000, len(frame), len(frame)) + frame)
    return path


def _devices(*args: str | Path) -> dict[str, dict]:
    proc = run_iotscan("devices", *args, "--format", "ndjson", check_code=0)
    return {r["mac"]: r for r in ndjson(proc.stdout) if r["event_type"] == "device"}


@pytest.fixture(scope="module")
def crafted_run(crafted: Path) -> dict[str, dict]:
    return _devices(crafted)


def _check_type_guess(record: dict) -> None:
    guess = record["type_guess"]
    if record["device_type"] != "unknown":
        assert guess is None
    elif guess is not None:
        assert set(guess) == {"device_type", "confidence"}
        assert guess["device_type"] in DEVICE_TYPES and guess["device_type"] != "unknown"
        assert 0.0 < guess["confidence"] < 1.0


@pytest.mark.parametrize("mac", [m for m, (_, _, t) in DEVICES.items() if t != "unknown"])
def test_generic_evidence_types_a_device_it_has_never_seen(crafted_run: dict[str, dict], mac: str) -> None:
    record = crafted_run[mac]
    _check_type_guess(record)
    assert record["device_type"] == DEVICES[mac][2], record["evidence"]
    assert record["model"] is None  # generic evidence names a type, never a product


def test_each_vote_shows_its_evidence(crafted_run: dict[str, dict]) -> None:
    def shown(mac: str, signal: str, points_to: str) -> bool:
        return any(e["signal"] == signal and points_to in e["points_to"] for e in crafted_run[mac]["evidence"])

    assert shown("44:61:32:00:00:0a", "mac_vendor", "ecobee: makes thermostat")  # what the MAC's maker makes
    assert shown("02:00:00:00:00:0b", "mdns_txt", "HomeKit accessory category 9: Thermostat")
    assert shown("02:00:00:00:00:0c", "ssdp_nt", "UPnP device type: digital security camera")
    assert shown("02:00:00:00:00:0d", "server_name", "thermostat (a thermostat word in a name it resolves)")
    assert shown("02:00:00:00:00:10", "mdns_service", "offers RTSP video")
    assert shown("d4:8a:fc:00:00:0f", "mac_vendor", "Wi-Fi module maker")


def test_weak_or_contradictory_evidence_stays_unknown_with_its_best_guess(crafted_run: dict[str, dict]) -> None:
    mixed = crafted_run["02:00:00:00:00:0e"]  # "Front Cam" and "Door Lock": as strong as each other
    assert mixed["device_type"] == "unknown" and mixed["confidence"] <= 0.3
    assert mixed["type_guess"]["device_type"] in ("camera", "lock") and mixed["type_guess"]["confidence"] >= 0.6
    module = crafted_run["d4:8a:fc:00:00:0f"]  # an Espressif MAC and one NTP flow: nothing points anywhere
    assert module["device_type"] == "unknown"
    assert module["type_guess"] is None or module["type_guess"]["confidence"] < 0.25  # behaviour's hint, at most
    for record in crafted_run.values():
        _check_type_guess(record)


def test_hue_bridge_sample_shows_its_homekit_category() -> None:
    bridge = _devices(SAMPLES / "hue-bridge-setup.pcap")["00:17:88:24:76:ff"]
    assert {"signal": "mdns_txt", "value": "ci=2", "points_to": "HomeKit accessory category 2: Bridge"} in \
        bridge["evidence"]
    assert bridge["device_type"] == "hub" and bridge["type_guess"] is None


# -- real captures of models left out -----------------------------------------------------------------------

REAL = [("EdimaxCam1", "camera"), ("D-LinkCam", "camera"), ("WeMoLink", "hub"), ("Withings", "health_monitor"),
        ("D-LinkSwitch", "smart_plug"), ("Aria", "health_monitor")]


@pytest.mark.parametrize(("folder", "device_type"), REAL)
def test_real_devices_are_typed_without_any_entry_written_with_them(folder: str, device_type: str) -> None:
    """A capture of each, fingerprinted without the behaviour model and without the signature entries written
    with its model's captures visible: only generic evidence is left, and it gives the type."""
    from iotscan.training.devices import profile_capture

    sentinel = require_shared("datasets", "iot-sentinel")
    row = next(r for r in csv.DictReader((sentinel / "devices.csv").open()) if r["folder"] == folder)
    capture = sorted((sentinel / folder).glob("*.pcap"))[0]
    without = load_signatures().without(row["model"])
    stage = profile_capture(capture, without)
    mac = row["mac"].lower()
    activity = stage.profiles()[mac]
    record = fingerprint(mac, activity, stage.hints.by_mac.get(mac), without, None, list(activity.ips))
    assert record["device_type"] == device_type, record["evidence"]
    assert record["model"] is None


# -- the user's own signatures ---------------------------------------------------------------------------------

OWN = {"schema": 1, "signatures": [{"signals": ["dhcp_hostname"], "regex": "^frontdoor", "weight": 0.9,
                                     "vendor": "Acme", "device_type": "doorbell", "points_to": "Acme doorbell",
                                     "source": "our own doorbells' names"}]}


def test_own_signatures_extend_the_bundled_ones(crafted: Path, crafted_run: dict[str, dict], tmp_path: Path) -> None:
    own = tmp_path / "own.json"
    own.write_text(json.dumps(OWN))
    assert crafted_run["02:00:00:00:00:11"]["device_type"] == "unknown"  # without the file
    found = _devices(crafted, "--signatures", own)
    bell = found["02:00:00:00:00:11"]
    assert (bell["device_type"], bell["vendor"]) == ("doorbell", "Acme")
    assert {"signal": "dhcp_hostname", "value": "frontdoor-7", "points_to": "Acme doorbell"} in bell["evidence"]
    assert found["02:00:00:00:00:0b"]["device_type"] == "thermostat"  # the bundled knowledge is still there
    proc = run_iotscan("analyze", crafted, "-f", "ndjson", "--no-score", "--signatures", own, check_code=0)
    [bell] = [r for r in ndjson(proc.stdout) if r["event_type"] == "device" and r["mac"] == "02:00:00:00:00:11"]
    assert bell["device_type"] == "doorbell"


BAD_FILES = {
    "not-json.json": ("{schema: 1", "not a JSON signature file"),
    "schema.json": ('{"schema": 2, "signatures": []}', "unsupported signature schema 2"),
    "type.json": ('{"schema": 1, "signatures": [{"signals": ["dhcp_hostname"], "regex": "^x", '
                  '"device_type": "toaster"}]}', "signatures #0: unknown device type 'toaster'"),
    "field.json": ('{"schema": 1, "signatures": [{"signals": ["dhcp_hostname"], "regex": "^x", "device_typ": "tv"}]}',
                   "signatures #0: unknown field 'device_typ'"),
    "regex.json": ('{"schema": 1, "signatures": [{"signals": ["dhcp_hostname"], "regex": "(", "device_type": "tv"}]}',
                   "signatures #0: bad regex"),
    "oui.json": ('{"schema": 1, "mac_vendors": [{"org": "acme", "types": {"tv": "most"}}]}',
                 "mac_vendors #0: types.tv: must be a number"),
}


@pytest.mark.parametrize("name", [*BAD_FILES, "missing.json"])
def test_a_bad_signature_file_is_one_clear_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name in BAD_FILES:
        path.write_text(BAD_FILES[name][0])
    expected = BAD_FILES[name][1] if name in BAD_FILES else "cannot read device signatures"
    with pytest.raises(SignatureError) as caught:
        read_signature_file(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("command", ["devices", "analyze", "live"])
@pytest.mark.parametrize("name", ["type.json", "missing.json"])
def test_a_bad_signature_file_stops_the_command_with_one_line_and_exit_2(tmp_path: Path, command: str,
                                                                          name: str) -> None:
    path = tmp_path / name
    if name in BAD_FILES:
        path.write_text(BAD_FILES[name][0])
    source = "lo" if command == "live" else SAMPLES / "tplink-hs110-setup.pcap"
    extra = ("--duration", "1") if command == "live" else ()
    proc = run_iotscan(command, source, *extra, "-f", "ndjson", "--signatures", path, timeout=60)
    assert_no_traceback(proc)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and str(path) in err, err
    assert proc.stdout == b""  # nothing was analysed


def test_signature_errors_name_the_file() -> None:
    with pytest.raises(SignatureError, match=r"^mine\.json: signatures #0: needs exactly one of"):
        parse_signatures({"schema": 1, "signatures": [{"signals": ["app"], "weight": 0.5}]}, "mine.json")


# -- the measurement ----------------------------------------------------------------------------------------------


def test_leave_one_model_out_on_a_small_subset() -> None:
    """Three models with two captures each: each left out of training and out of the signature data in turn."""
    from iotscan.training.device_eval import TARGETS, leave_one_model_out
    from iotscan.training.devices import Unit, _fill, profile_capture

    sentinel = require_shared("datasets", "iot-sentinel")
    rows = {r["folder"]: r for r in csv.DictReader((sentinel / "devices.csv").open())}
    signatures = load_signatures()
    units = []
    for folder in ("TP-LinkPlugHS100", "TP-LinkPlugHS110", "Withings"):
        row = rows[folder]
        for capture in sorted((sentinel / folder).glob("*.pcap"))[:2]:
            unit = Unit(name=f"{folder}/{capture.name}", group=str(capture), device=f"iot-sentinel/{folder}",
                        mac=row["mac"].lower(), model=row["model"], vendor=row["vendor"],
                        device_type=row["device_type"])
            units.append(_fill(unit, profile_capture(capture, signatures), signatures))
    result = leave_one_model_out(units, [], 0, signatures, lambda _: None)
    assert (result["models"], result["units"], result["devices"]) == (3, 6, 3)
    assert result["targets"] == TARGETS
    assert result["type_right"] + result["type_unknown"] + result["type_wrong"] == pytest.approx(1.0)
    rows_by_device = {r["device"]: r for r in result["per_device"]}
    hs100 = rows_by_device["iot-sentinel/TP-LinkPlugHS100"]
    assert hs100["entries_left_out"] > 0  # the TP-Link product signatures written with its captures
    assert hs100["type_right"] == 1.0 and hs100["typed_by"]  # the Kasa code family, cloud and behaviour
    assert rows_by_device["iot-sentinel/Withings"]["type_right"] == 1.0  # its maker makes health monitors
    assert result["type_wrong"] == 0.0


def test_the_documented_example_file_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "device-types.md").read_text()
    example = re.search(r"## Adding your own signatures.*?```json\n(.*?)```", doc, re.S)
    assert example, "docs/device-types.md lost its example file"
    path = tmp_path / "acme.json"
    path.write_text(example.group(1))
    own = read_signature_file(path)
    assert len(own.signatures) == 3 and own.mac_vendors[0].vendor == "Acme"
    assert {t for m in own.match({"mdns_instance": ["Garage GateOpener"]}) for t, _ in m.types} == {"appliance"}
