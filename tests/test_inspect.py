"""`iotscan inspect`: real flows of real captures, dissected by the real tshark through pyshark.

Expected values were read from the captures by hand (tshark -V / -T fields, xxd), not produced by
iotscan. Flow ids are taken from the records analyze writes (FlowSource + flow_record, the code
analyze runs), and one test takes them from `iotscan analyze` itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.errors import InputError
from iotscan.inspect import (
    FlowSelector,
    find_flows,
    flows_filter,
    inspect_command,
    parse_five_tuple,
)
from iotscan.output.records import flow_record
from tests.conftest import REPO, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (sudo apt-get install tshark)")

TPLINK = SAMPLES / "tplink-hs110-setup.pcap"
HUE = SAMPLES / "hue-bridge-setup.pcap"
MIRAI = SAMPLES / "mirai-c2-irc.pcap"


def flow_records(capture: Path) -> list[dict]:
    """The flow records analyze writes for a capture (same meter, same record builder)."""
    return [flow_record(f, str(capture), capture.name) for f in FlowSource(MeterConfig(source=str(capture)))]


def one_flow(capture: Path, **match) -> dict:
    found = [r for r in flow_records(capture) if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, found
    return found[0]


def inspect(*args, check_code: int | None = 0, **kwargs) -> tuple[list[dict], list[dict], dict]:
    proc = run_iotscan("inspect", *args, "--format", "ndjson", check_code=check_code, timeout=120, **kwargs)
    assert_no_traceback(proc)
    records = ndjson(proc.stdout)
    assert records[-1]["event_type"] == "summary"
    flows = [r for r in records if r["event_type"] == "flow"]
    packets = [r for r in records if r["event_type"] == "packet"]
    return flows, packets, records[-1]


def by_frame(packets: list[dict]) -> dict[int, dict]:
    return {p["frame_number"]: p for p in packets}


# -- dissected fields against values read by hand ---------------------------------------------------


@needs_tshark
def test_dns_query_and_answers():
    flow = one_flow(TPLINK, server_name="devs.tplinkcloud.com")
    flows, packets, summary = inspect(TPLINK, str(flow["flow_id"]))
    assert flows == [flow]  # the same record analyze writes
    assert [p["frame_number"] for p in packets] == [15, 16]
    query, response = packets
    assert query["direction"] == "src2dst" and response["direction"] == "dst2src"
    assert (query["length"], response["length"]) == (80, 414)
    assert query["layers"] == ["eth", "ip", "udp", "dns"]
    assert query["timestamp"] == "2016-09-01T11:28:31.407793Z" and query["timestamp_ms"] == 1472729311407
    assert query["dns_query"] == "devs.tplinkcloud.com" and query["dns_qtype"] == "A"
    assert query["dns_response"] is False and query["dns_id"] == 3
    assert response["dns_response"] is True and response["dns_rcode"] == 0
    elb = "prd-elb-connector-0-1621750456.eu-west-1.elb.amazonaws.com"
    assert response["dns_answers"] == [
        {"name": "devs.tplinkcloud.com", "type": "CNAME", "ttl": 24, "data": elb},
        {"name": elb, "type": "A", "ttl": 60, "data": "52.49.65.150"},
        {"name": elb, "type": "A", "ttl": 60, "data": "52.49.107.41"},
        {"name": elb, "type": "A", "ttl": 60, "data": "52.209.224.132"},
        {"name": elb, "type": "A", "ttl": 60, "data": "52.18.200.165"},
    ]
    assert all(p["flow_id"] == flow["flow_id"] and p["community_id"] == flow["community_id"] for p in packets)
    assert summary["packets"] == 2 and summary["flows"] == 1 and summary["warnings"] == []


@needs_tshark
def test_http_request_and_response_by_5tuple():
    # Either direction of the 5-tuple finds the flow.
    flows, packets, _ = inspect(HUE, "--5tuple", "10.10.10.6:80-10.10.10.30:58806/tcp")
    assert len(flows) == 1 and flows[0]["src_port"] == 58806
    # tshark -Y tcp.port==58806: frames 190-196, 202 (a retransmission), 204-207
    assert [p["frame_number"] for p in packets] == [190, 191, 192, 193, 194, 195, 196, 202, 204, 205, 206, 207]
    assert len(packets) == flows[0]["packets"]
    frames = by_frame(packets)
    assert frames[190]["tcp_flags"] == "SYN" and frames[191]["tcp_flags"] == "SYN,ACK"
    request = frames[193]
    assert request["direction"] == "src2dst"
    assert (request["http_method"], request["http_host"], request["http_uri"]) == ("GET", "10.10.10.6", "/api/null")
    assert request["http_user_agent"] == "Dalvik/2.1.0 (Linux; U; Android 5.1.1; SM-N7505 Build/LMY47X)"
    response = frames[196]
    assert response["direction"] == "dst2src" and response["tcp_flags"] == "FIN,PSH,ACK"
    assert (response["http_status"], response["http_reason"], response["http_content_type"]) == (
        200, "OK", "application/json")
    assert response["reassembled_frames"] == [195, 196]


@needs_tshark
def test_tls_handshake_with_sni():
    capture = require_shared("pcaps", "ndpi", "443-curl.pcap")
    flow = one_flow(capture, src_port=55523, dst_port=443)
    _, packets, summary = inspect(capture, flow["community_id"], "--limit", "8")
    assert summary["limited"] is True and len(packets) == 8
    frames = by_frame(packets)
    hello = frames[4]
    assert hello["direction"] == "src2dst" and hello["tls_handshake_types"] == ["client_hello"]
    assert hello["tls_sni"] == "www.ntop.org"
    assert hello["tls_version"] == "TLS 1.2" and hello["tls_record_version"] == "TLS 1.0"
    assert hello["tls_alpn"] == ["h2", "http/1.1"]
    assert hello["tls_ja3"] == "2a26b1a62e40d25d4de3babc9d532f30"
    server = frames[6]
    assert server["direction"] == "dst2src" and server["tls_handshake_types"] == ["server_hello"]
    assert server["tls_cipher_suite"] == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"  # 0xc02f
    assert server["tls_ja3s"] == "ae53107a2e47ea20c72ac44821a728bf" == flow["server_fingerprint"]
    assert frames[8]["tls_handshake_types"] == ["server_key_exchange", "server_hello_done"]


@needs_tshark
def test_mqtt_subscribe_and_publish():
    capture = require_shared("pcaps", "ndpi", "mqtt.pcap")
    flow = one_flow(capture, src_port=1883)  # the capture starts with a packet of the broker
    flows, packets, _ = inspect(capture, str(flow["flow_id"]))
    frames = by_frame(packets)
    assert flows == [flow] and list(frames) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert frames[2]["mqtt_msgtype"] == "CONNECT" and frames[2]["mqtt_client_id"] == "cbaabcbabacbbbbbaaaaab"
    assert frames[3]["mqtt_msgtype"] == "SUBSCRIBE" and frames[3]["mqtt_topic"] == "astr/s720/02D5050223D3/99"
    publish = frames[6]
    assert publish["direction"] == "dst2src"  # client to broker; the broker is the flow's src
    assert (publish["mqtt_msgtype"], publish["mqtt_topic"], publish["mqtt_qos"]) == ("PUBLISH", "astr/admin/otaupd8", 0)
    assert publish["mqtt_message"].startswith('{ "u": "02D5050223D3", "P": "02D5050223D3", "d": "02D5050223D3", ')
    assert publish["mqtt_message"].endswith('"slaves": [ "40A5EFB0DFE2", "40A5EFB0DC82", "40A5EFB0DAE2" ] } }')
    assert frames[7]["mqtt_message"] == '{"s":204,"x":"","success_msg":"Update not pushed for area."}'
    assert frames[8]["mqtt_msgtype"] == "DISCONNECT"


@needs_tshark
def test_dhcp_ssdp_and_telnet_fields():
    flows, packets, _ = inspect(TPLINK, "--5tuple", "0.0.0.0:68-255.255.255.255:67/udp")
    assert [p["frame_number"] for p in packets] == [3, 4, 8]
    discover, _, request = packets
    assert discover["dhcp_msgtype"] == "DISCOVER" and request["dhcp_msgtype"] == "REQUEST"
    assert discover["dhcp_hostname"] == "HS110(EU)" and discover["dhcp_vendor_class"] == "udhcp 0.9.9-pre"
    assert discover["dhcp_param_list"] == [1, 3, 6, 12, 15, 28]
    assert discover["dhcp_client_mac"] == "50:c7:bf:00:c7:03" and request["dhcp_requested_ip"] == "10.10.10.20"
    assert flows[0]["dhcp_hostname"] == "hs110(eu)"  # nDPI lower-cases it; the packet has it as sent

    _, packets, _ = inspect(HUE, "--5tuple", "10.10.10.6:1900-239.255.255.250:1900/udp", "--limit", "1")
    notify = packets[0]
    assert notify["frame_number"] == 137 and notify["layers"] == ["eth", "ip", "udp", "ssdp"]
    assert (notify["http_method"], notify["http_uri"]) == ("NOTIFY", "*")
    assert notify["http_location"] == "http://10.10.10.6:80/description.xml"
    assert notify["http_server"] == "Linux/3.14.0 UPnP/1.0 IpBridge/1.9.0"
    assert (notify["ssdp_nt"], notify["ssdp_nts"]) == ("upnp:rootdevice", "ssdp:alive")
    assert notify["ssdp_usn"] == "uuid:2f402f80-da50-11e1-9b23-0017882476ff::upnp:rootdevice"

    capture = require_shared("pcaps", "ndpi", "telnet.pcap")
    _, packets, _ = inspect(capture, "--5tuple", "192.168.0.2:1550-192.168.0.1:23/tcp", "--payload")
    frames = by_frame(packets)
    assert frames[29]["telnet_data"] == "login: " and frames[29]["direction"] == "dst2src"
    assert frames[31]["telnet_data"] == "fake\r\n" and frames[31]["direction"] == "src2dst"
    assert frames[36]["telnet_data"] == "Password:" and frames[38]["telnet_data"] == "user\r\n"
    assert frames[31]["payload_hex"] == "66616b650d0a"  # tshark -x: "fake\r\n"


@needs_tshark
def test_community_id_of_several_flows_irc_c2():
    # The bot's IRC connection lasts longer than the 1800 s active timeout: two flow records, one
    # community id. 123 packets of tcp.port==48986 in the capture (tshark), 87 + 36 in the records.
    flows_all = [r for r in flow_records(MIRAI) if 48986 in (r["src_port"], r["dst_port"])]
    assert sorted(r["packets"] for r in flows_all) == [36, 87]
    cid = flows_all[0]["community_id"]
    flows, packets, summary = inspect(MIRAI, cid)
    assert [f["packets"] for f in flows] == [87, 36] and len(packets) == 123
    assert [w["code"] for w in summary["warnings"]] == ["several_flows"]
    for flow in flows:  # each packet counted in the right flow, in the right direction
        mine = [p for p in packets if p["flow_id"] == flow["flow_id"]]
        assert len(mine) == flow["packets"]
        assert sum(p["direction"] == "src2dst" for p in mine) == flow["src2dst_packets"]
    nick = by_frame(packets)[11]
    assert nick["irc_lines"] == ["NICK [ARM4T|PCVREB]", "USER VHIDFQC localhost localhost :VHIDFQC"]

    flows, packets, summary = inspect(MIRAI, cid, "--index", "2")
    assert [f["packets"] for f in flows] == [36] and len(packets) == 36 and summary["warnings"] == []
    assert all(p["flow_id"] == flows[0]["flow_id"] for p in packets)
    # The second part starts where the first was cut: its window must not reach back into it.
    assert min(p["timestamp_ms"] for p in packets) == flows[0]["first_seen_ms"]

    err = run_iotscan("inspect", MIRAI, cid, "--index", "3", check_code=2).stderr.decode()
    assert f"matches 2 flows in {MIRAI}: --index 3 is out of range" in err


@needs_tshark
def test_flow_ids_from_analyze_output_and_explain_command(tmp_path):
    # A capture in a folder with a space: the command must quote it, and still find the flow.
    folder = tmp_path / "my captures"
    folder.mkdir()
    capture = folder / TPLINK.name
    shutil.copy(TPLINK, capture)
    proc = run_iotscan("analyze", capture, "--format", "ndjson", "--quiet", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    records = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    ntp = next(r for r in records if r["dst_port"] == 123)
    command = inspect_command(ntp)
    argv = shlex.split(command)
    assert argv == ["iotscan", "inspect", str(capture), str(ntp["flow_id"]), "--5tuple",
                    "10.10.10.20:39270-129.6.15.29:123/udp"]
    # analyze's records carry the fields of its later stages (devices, verdicts) too.
    flows, packets, _ = inspect(*argv[2:])
    assert flows == [{k: ntp[k] for k in flows[0]}] and [p["frame_number"] for p in packets] == [14, 20]
    flows, packets, _ = inspect(*argv[2:4])  # the id alone: the whole capture is metered
    assert flows == [{k: ntp[k] for k in flows[0]}] and [p["frame_number"] for p in packets] == [14, 20]
    assert inspect_command(ntp, idle_timeout=30).endswith(" --idle-timeout 30")


@needs_tshark
def test_explain_commands_work_on_a_compressed_linux_cooked_capture(tmp_path):
    """log4j-exploit.pcap is Linux cooked (no Ethernet framing: the 5-tuple's VLAN-aware filter is refused, and
    was an error), here gzip-compressed (inspect reads it decompressed, as analyze did): each attack's
    --explain command shows its packets, and the temporary copy is removed."""
    import gzip

    packed = tmp_path / "log4j.pcap.gz"
    packed.write_bytes(gzip.compress((SAMPLES / "log4j-exploit.pcap").read_bytes()))
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    env = {"TMPDIR": str(spool_dir)}
    proc = run_iotscan("analyze", packed, "--explain", "-f", "ndjson", "-q", check_code=0, env=env)
    attacks = [r for r in ndjson(proc.stdout) if r.get("inspect")]
    assert len(attacks) >= 2
    for r in attacks[:2]:
        argv = shlex.split(r["inspect"])
        assert argv[2] == str(packed)
        flows, packets, summary = inspect(*argv[2:], env=env)
        assert [f["flow_id"] for f in flows] == [r["flow_id"]] and len(packets) == r["packets"]
        assert summary["warnings"] == []
    assert list(spool_dir.iterdir()) == []


# -- errors -----------------------------------------------------------------------------------------


@needs_tshark
def test_flow_not_found_and_bad_input(tmp_path):
    proc = run_iotscan("inspect", TPLINK, "1234567890123456789", check_code=2)
    assert proc.stderr.decode().startswith(f"iotscan: error: no flow with id 1234567890123456789 in {TPLINK}")
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    proc = run_iotscan("inspect", TPLINK, "123456", check_code=2)  # the first digits of no flow's id
    assert proc.stderr.decode().startswith(f"iotscan: error: no flow with an id starting with 123456 in {TPLINK}")
    proc = run_iotscan("inspect", TPLINK, "123", check_code=2)
    assert "bad flow id 123: give a flow_id, or at least its first 6 digits" in proc.stderr.decode()
    # A real flow id with the 5-tuple of another flow: not that flow.
    proc = run_iotscan("inspect", TPLINK, "8583378781367076039", "--5tuple", "10.10.10.20:39270-129.6.15.29:123/udp",
                       check_code=2)
    assert "no flow with id 8583378781367076039 among the flows of 10.10.10.20:39270-129.6.15.29:123/udp" in \
        proc.stderr.decode()
    proc = run_iotscan("inspect", TPLINK, "abc", check_code=2)
    assert proc.stderr.decode().startswith("iotscan: error: bad FLOW 'abc': expected a flow_id")

    config = MeterConfig(source=str(TPLINK))
    for selector in (FlowSelector(community_id="1:AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                     FlowSelector(five_tuple=parse_five_tuple("10.0.0.1:1-10.0.0.2:2/tcp"))):
        lookup = find_flows(str(TPLINK), selector, config)
        assert lookup.flows == [] and lookup.saw_every_packet  # the 5-tuple pass found nothing: metered again
    for flow, five_tuple, message in (("fe80::1:5-fe80::2:6/udp", None, "brackets"),
                                      ("1.2.3.4:1-5.6.7.8:2/xyz", None, "unknown protocol"),
                                      (None, "1.2.3.4:1-5.6.7.8:2/icmp", "protocol icmp has no ports"),
                                      (None, None, "missing FLOW"), (str(1 << 63), None, "63-bit")):
        with pytest.raises(InputError, match=message):
            FlowSelector.parse(flow, five_tuple)

    not_capture = tmp_path / "notes.pcap"
    not_capture.write_text("hello")
    for path, message in ((not_capture, "not a pcap or pcapng capture"), (tmp_path, "is a directory")):
        proc = run_iotscan("inspect", path, "8583378781367076039", check_code=2)
        err = proc.stderr.decode()
        assert err.startswith(f"iotscan: error: {path}: {message}") and len(err.strip().splitlines()) == 1, err
    proc = run_iotscan("inspect", TPLINK, "1", "--format", "csv", check_code=2)
    assert "inspect writes table, ndjson or json" in proc.stderr.decode()


def test_five_tuple_parsing():
    t = parse_five_tuple("[fe80::1]:5353-[ff02::fb]:5353/udp")
    assert (t.src_ip, t.src_port, t.dst_ip, t.dst_port, t.protocol) == ("fe80::1", 5353, "ff02::fb", 5353, 17)
    assert str(parse_five_tuple("10.0.0.1-10.0.0.2/icmp")) == "10.0.0.1:0-10.0.0.2:0/icmp"
    assert str(parse_five_tuple("[::1]:1-[::2]:2/132")) == "[::1]:1-[::2]:2/sctp"
    assert FlowSelector.parse("8583378781367076039", None).flow_id == 8583378781367076039
    prefix = FlowSelector.parse("858337", None)  # the first digits of an id, as the table shows them
    assert prefix.flow_id is None and prefix.flow_id_prefix == "858337" and not prefix.unique
    assert prefix.matches({"flow_id": 8583378781367076039}) and not prefix.matches({"flow_id": 8583478781367076039})
    with pytest.raises(InputError, match="at least its first 6 digits"):
        FlowSelector.parse("4242", None)
    assert FlowSelector.parse("1:W/WJJ8d5Wlqd7jZFMc6Tc78oub0=", None).community_id is not None


def _strip_path() -> dict[str, str]:
    """An environment where no tshark can be found: PATH without any directory holding one."""
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "tshark").exists())
    return {"PATH": path or "/nonexistent", "IOTSCAN_TSHARK": ""}


def test_tshark_missing_exit_3_and_other_commands_unaffected():
    # How pyshark looks for tshark (pyshark.tshark.tshark.get_process_path): a config.ini, then each
    # directory of PATH. iotscan looks on PATH only (or $IOTSCAN_TSHARK): a PATH without tshark's
    # directory is a machine without tshark, as far as any of them can tell.
    env = _strip_path()
    proc = run_iotscan("inspect", TPLINK, "8583378781367076039", env=env, check_code=3)
    err = proc.stderr.decode().strip()
    assert err.startswith("iotscan: error: tshark is not installed") and "sudo apt-get install tshark" in err
    assert len(err.splitlines()) == 1
    proc = run_iotscan("inspect", TPLINK, "8583378781367076039", env={"IOTSCAN_TSHARK": "/nonexistent/tshark"},
                       check_code=3)
    assert "IOTSCAN_TSHARK=/nonexistent/tshark is not an executable" in proc.stderr.decode()

    # analyze behaves the same with or without tshark, and the CLI does not even import pyshark.
    with_tshark = run_iotscan("analyze", TPLINK, "--format", "ndjson", "--quiet", timeout=120)
    without = run_iotscan("analyze", TPLINK, "--format", "ndjson", "--quiet", env=env, timeout=120)
    assert without.returncode == with_tshark.returncode
    assert [r.get("flow_id") for r in ndjson(without.stdout)] == [r.get("flow_id") for r in ndjson(with_tshark.stdout)]
    code = "import sys, iotscan.cli, iotscan.inspect; assert 'pyshark' not in sys.modules, 'pyshark imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, **env})


# -- tshark as a child process ----------------------------------------------------------------------


def _replicated_capture(source: Path, target: Path, copies: int) -> None:
    """A large capture from copies of a small one, each shifted a day later."""
    classic = target.with_suffix(".one.pcap")
    subprocess.run([TSHARK, "-r", str(source), "-F", "pcap", "-w", str(classic)], check=True, capture_output=True)
    data = classic.read_bytes()
    header, body = data[:24], data[24:]
    assert header[:4] == b"\xd4\xc3\xb2\xa1"  # little-endian, microseconds
    records = []
    off = 0
    while off + 16 <= len(body):
        sec, usec, incl, orig = struct.unpack_from("<IIII", body, off)
        records.append((sec, usec, incl, orig, body[off + 16:off + 16 + incl]))
        off += 16 + incl
    with target.open("wb") as out:
        out.write(header)
        for copy in range(copies):
            for sec, usec, incl, orig, payload in records:
                out.write(struct.pack("<IIII", sec + copy * 86400, usec, incl, orig) + payload)


def _alive(process: psutil.Process) -> bool:
    """Running: a process that has exited but is not reaped yet is a zombie, which is_running() still counts."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@needs_tshark
def test_sigint_ends_tshark_and_exits_130(tmp_path):
    capture = tmp_path / "big.pcap"
    _replicated_capture(MIRAI, capture, 40)  # 160,000 packets: tshark needs several seconds
    # A flow of the last copy: tshark has the whole capture to read before it is complete.
    last = max(flow_records(MIRAI), key=lambda r: r["first_seen_ms"])
    args = ["--5tuple", f"{last['src_ip']}:{last['src_port']}-{last['dst_ip']}:{last['dst_port']}/tcp"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A Ctrl-C as a terminal sends it: pytest run as a background job of a non-interactive shell ignores
    # SIGINT, and its children would inherit that, so the child first takes Python's own handler back.
    run_with_sigint = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
                      "sys.argv = ['iotscan', *sys.argv[1:]]; from iotscan.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", run_with_sigint, "inspect", str(capture), *args, "-f", "ndjson"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    tshark = None
    deadline = time.monotonic() + 60
    while tshark is None and time.monotonic() < deadline and proc.poll() is None:
        tshark = next((c for c in _children(proc.pid) if c.name() == "tshark"), None)
        time.sleep(0.05)
    assert tshark is not None, "tshark never started"
    time.sleep(0.5)
    assert _alive(tshark) and proc.poll() is None, "inspect finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (err.decode()[-2000:], out.decode()[-600:])
    assert b"Traceback" not in err
    assert not tshark.is_running(), "tshark outlived inspect"
    summary = ndjson(out)[-1]
    assert summary["event_type"] == "summary" and summary["inputs"][0]["status"] == "interrupted"


@needs_tshark
def test_damaged_capture_gives_packets_and_one_warning_not_a_hang(tmp_path):
    # Cut in the middle of a packet: tshark reports it after the packets before the damage.
    damaged = tmp_path / "cut.pcap"
    damaged.write_bytes(HUE.read_bytes()[:200_000])
    started = time.monotonic()
    # --any-time: read to the end of the file, where the damage is.
    _, packets, summary = inspect(damaged, "--5tuple", "10.10.10.6:1900-239.255.255.250:1900/udp", "--any-time")
    assert time.monotonic() - started < 60
    assert packets and all(p["layers"][-1] == "ssdp" for p in packets)
    assert [w["code"] for w in summary["warnings"]] == ["packets"]
    assert "cut short in the middle of a packet" in summary["warnings"][0]["message"]


# -- the filter -------------------------------------------------------------------------------------


@needs_tshark
def test_iso_and_epoch_time_filters_select_the_same_packets():
    lookup = find_flows(str(MIRAI), FlowSelector(community_id="1:W/WJJ8d5Wlqd7jZFMc6Tc78oub0="),
                        MeterConfig(source=str(MIRAI), statistics=False))
    found = lookup.flows
    assert len(found) == 2 and lookup.saw_every_packet

    def frames(display_filter: str) -> list[str]:
        out = subprocess.run([TSHARK, "-n", "-r", str(MIRAI), "-Y", display_filter, "-T", "fields", "-e",
                              "frame.number"], capture_output=True, check=True).stdout
        return out.split()

    # The second flow: its 36 packets, then every IP packet after its end (inspect stops at the first).
    iso = frames(flows_filter(found[1:], "iso"))
    assert len(iso) > 36
    assert frames(flows_filter(found[1:], "epoch")) == iso
    assert frames(flows_filter(found[1:], "iso", any_time=True)) == frames(flows_filter(found, "iso", any_time=True))
