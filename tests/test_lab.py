"""The attack lab: its plan and safety gates (everywhere), and real runs in namespaces (root only)."""

from __future__ import annotations

import csv
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, assert_no_traceback, run_iotscan

from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.errors import CaptureError, ExitCode, InputError
from iotscan.lab import run as lab_run
from iotscan.lab.netns import LAN_SEGMENTS, WAN, IsolationError, Lab, cleanup_stale, ip_json, plan_lab
from iotscan.lab.scenarios import CATALOGUE, FAMILIES, FlowRule, label_flow, select, write_rules
from iotscan.lab.tools import BASE_TOOLS, missing_tools

IS_ROOT = os.geteuid() == 0
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def _skip_unless_lab_possible(*tools: str) -> None:
    if not IS_ROOT:
        pytest.skip("the attack lab needs root (network namespaces); CI runs as root")
    missing = missing_tools([*BASE_TOOLS, *tools])
    if missing:
        pytest.skip(f"lab tools missing: {', '.join(missing)} (install.sh installs them; `iotscan lab check`)")


def _lab_namespaces(pid: int) -> list[str]:
    return [e["name"] for e in ip_json("netns", "list") if e["name"].startswith(f"iotlab-{pid}-")]


# -- everywhere: the plan, the gates, the catalogue, the rules ------------------------------------------

def test_plan_is_reproducible_private_and_varies_with_the_seed() -> None:
    plan = plan_lab(1)
    assert plan == plan_lab(1)
    assert plan_lab(2).networks != plan.networks
    for segment in LAN_SEGMENTS:
        assert any(plan.networks[segment].subnet_of(p) for p in _PRIVATE)
    assert plan.networks[WAN].subnet_of(ipaddress.ip_network("100.64.0.0/10"))
    assert len({plan.networks[s] for s in LAN_SEGMENTS}) == 2
    addresses = [h.ip for h in plan.hosts.values()] + list(plan.router.values())
    assert len(set(addresses)) == len(addresses)
    for host in plan.hosts.values():
        net = plan.networks[host.segment]
        assert host.ip in net and host.ip not in (net.network_address, net.broadcast_address)
        assert int(host.mac.split(":")[0], 16) & 0b11 == 0b10  # locally administered unicast
    # The host's own networks are kept out.
    moved = plan_lab(1, avoid=[plan.networks["lan1"]])
    assert not moved.networks["lan1"].overlaps(plan.networks["lan1"])


@pytest.mark.parametrize("target", ["8.8.8.8", "0.0.0.0/0", "10.0.0.0/8", "127.0.0.1", "::1", "example.com", ""])
def test_targets_outside_the_lab_are_refused(target: str) -> None:
    plan = plan_lab(5)
    with pytest.raises(IsolationError):
        plan.require_target(target)


def test_targets_inside_the_lab_pass() -> None:
    plan = plan_lab(5)
    for host in plan.hosts.values():
        assert plan.require_target(host.ip) == str(host.ip)
    for net in plan.networks.values():
        assert plan.require_target(net) == str(net)


def test_catalogue_covers_every_family_within_the_time_budget() -> None:
    assert set(FAMILIES) == {s.family for s in CATALOGUE.values() if s.label == "attack"}
    for sc in CATALOGUE.values():
        assert sc.label in ("benign", "attack")
        assert (sc.family in FAMILIES) == (sc.label == "attack"), sc.name
        assert sc.description and sc.seconds > 0
    assert any(s.mixed for s in CATALOGUE.values())
    assert sum(s.seconds for s in select(None)) < 540  # the default run must fit in 10 minutes
    # the infection scenarios (baselines: minutes of normal life first) run only when named
    assert {s.name for s in CATALOGUE.values() if s not in select(None)} == {"infection-normal", "infection-mirai"}
    assert [s.name for s in select(["infection-"])] == ["infection-normal", "infection-mirai"]
    assert [s.name for s in select(["scan"])] == [n for n in CATALOGUE if n.startswith("scan-")]
    assert {s.name for s in select(["benign"])} == {n for n in CATALOGUE if n.startswith("benign-")}
    assert [s.name for s in select(["c2-"])] == ["c2-tcp-beacon", "c2-irc"]
    with pytest.raises(KeyError):
        select(["no-such-scenario"])


def test_the_audit_names_an_attack_no_flow_shows() -> None:
    """A tool that did not run (busybox wget -T crashed before sending: the infection's loader) leaves its rules
    without a flow; the audit says which. On the committed infection capture every attack shows; a rule for a
    download that never happened is named, though its hosts' other rules match (its reply rule is not)."""
    data = REPO / "tests" / "data" / "baseline"
    rules = lab_run.read_rules(data / "infection-mirai.rules.csv")
    involved, hostile = set(), set()
    counts, _, _, silent = lab_run.audit_flows(data / "infection-mirai.pcap", rules, ("benign", ""), involved, hostile)
    assert silent == [] and counts["attack/c2"] >= 2
    cam, cnc = rules[2].src_ip, rules[2].dst_ip  # the loader's rule: camera -> loader, tcp/80
    never = [FlowRule(cam, cnc, 6, 8080, "attack", "exploit"), FlowRule(cnc, cam, None, None, "attack", "exploit")]
    _, _, _, silent = lab_run.audit_flows(data / "infection-mirai.pcap", rules + never, ("benign", ""), involved,
                                          hostile)
    assert silent == [f"exploit {cam} -> {cnc}:8080"]


def test_flow_rules_first_match_wins_and_round_trip(tmp_path: Path) -> None:
    rules = [FlowRule("1.1.1.1", "2.2.2.2", 6, 22, "attack", "bruteforce"),
             FlowRule("1.1.1.1", "", None, None, "attack", "scan"),
             FlowRule("", "3.3.3.3", 17, None, "attack", "dos")]
    default = ("benign", "")
    assert label_flow(rules, default, "1.1.1.1", "2.2.2.2", 6, 22) == ("attack", "bruteforce")
    assert label_flow(rules, default, "1.1.1.1", "2.2.2.2", 6, 80) == ("attack", "scan")
    assert label_flow(rules, default, "9.9.9.9", "3.3.3.3", 17, 53) == ("attack", "dos")
    assert label_flow(rules, default, "9.9.9.9", "3.3.3.3", 6, 53) == default
    assert label_flow(rules, default, "2.2.2.2", "1.1.1.1", 6, 40000) == default  # direction matters
    path = tmp_path / "rules.csv"
    write_rules(path, rules)
    assert path.read_text().splitlines()[0] == "src_ip,dst_ip,protocol,dst_port,label,family"
    assert lab_run.read_rules(path) == rules


def test_not_root_is_a_one_line_capture_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_run.os, "geteuid", lambda: 1000)
    with pytest.raises(CaptureError) as err:
        lab_run.generate(lab_run.Options(out_dir=tmp_path / "out", scenarios=["scan-nmap-syn"]))
    assert err.value.exit_code == ExitCode.CAPTURE and "root" in err.value.message
    assert not (tmp_path / "out").exists()


def test_missing_tools_name_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_tools(["sh", "no-such-lab-tool-xyz"]) == ["no-such-lab-tool-xyz"]
    monkeypatch.setattr(lab_run, "missing_tools", lambda tools: ["hping3", "arpspoof"])
    with pytest.raises(CaptureError) as err:
        lab_run.check_tools(select(["dos-syn-flood"]))
    assert "dsniff" in err.value.message and "hping3" in err.value.message
    assert "apt-get install -y" in err.value.message


def test_cli_refuses_bad_usage_in_one_line(tmp_path: Path) -> None:
    proc = run_iotscan("lab", "generate", tmp_path / "out", "--scenarios", "no-such-scenario")
    assert proc.returncode == ExitCode.USAGE
    assert_no_traceback(proc)
    assert proc.stderr.decode().count("\n") == 1 and "no-such-scenario" in proc.stderr.decode()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    proc = run_iotscan("lab", "generate", tmp_path / "full", "--scenarios", "scan-nmap-syn")
    assert proc.returncode in (ExitCode.USAGE, ExitCode.CAPTURE)  # not empty (root) or not root
    assert_no_traceback(proc)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


def test_cli_check_agrees_with_the_installed_tools() -> None:
    proc = run_iotscan("lab", "check")
    assert_no_traceback(proc)
    missing = missing_tools(lab_run.needed_tools(select(None)))
    if missing:
        assert proc.returncode == ExitCode.CAPTURE
        assert "apt-get install" in proc.stderr.decode()
    else:
        assert proc.returncode == 0, proc.stderr.decode()
        assert "all lab tools are installed" in proc.stdout.decode()


def test_an_unusable_duration_scale_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        lab_run.generate(lab_run.Options(out_dir=tmp_path, duration_scale=0))


# -- root: real namespaces ------------------------------------------------------------------------------

@pytest.mark.root
def test_namespaces_are_isolated_and_torn_down() -> None:
    _skip_unless_lab_possible()
    lab = Lab(plan_lab(11))
    outside = f"iotscan-test-{os.getpid()}"
    try:
        lab.create()
        lab.check_isolation()
        assert len(lab.namespaces) == len(lab.plan.hosts) + 2
        for name in lab.namespaces:
            routes = ip_json("-n", name, "-4", "route", "show", "table", "all")
            assert all(r.get("dst", "default") != "default" for r in routes), name
            for link in ip_json("-n", name, "-d", "link", "show"):
                if (link.get("linkinfo") or {}).get("info_kind") == "veth":
                    assert "link_netnsid" in link  # the peer is in another (lab) namespace
        # The check must catch a default route and a foreign interface.
        hub = lab.plan.host("lan1-hub")
        hub_ns = lab.ns(hub.role)
        subprocess.run(["ip", "-n", hub_ns, "route", "add", "default", "via", str(lab.plan.router["lan1"])],
                       check=True)
        with pytest.raises(IsolationError, match="route"):
            lab.check_isolation()
        subprocess.run(["ip", "-n", hub_ns, "route", "del", "default"], check=True)
        lab.check_isolation()
        # ... and an interface it did not make, linked to a namespace that is not the lab's.
        subprocess.run(["ip", "netns", "add", outside], check=True)
        subprocess.run(["ip", "-n", hub_ns, "link", "add", "leak0", "type", "veth", "peer", "name", "leak1",
                        "netns", outside], check=True)
        with pytest.raises(IsolationError, match="leak0"):
            lab.check_isolation()
        lab._expected_links[hub_ns].add("leak0")  # even under a name the lab uses, the peer gives it away
        with pytest.raises(IsolationError, match="outside the lab"):
            lab.check_isolation()
    finally:
        lab.destroy()
        subprocess.run(["ip", "netns", "del", outside], capture_output=True)
    assert _lab_namespaces(os.getpid()) == []
    assert not lab.workdir.exists()


@pytest.mark.root
def test_stale_namespaces_of_a_dead_run_are_removed() -> None:
    _skip_unless_lab_possible()
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"iotlab-{dead.pid}-leftover"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in cleanup_stale()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert _lab_namespaces(dead.pid) == []


@pytest.mark.root
def test_generate_records_labeled_captures(tmp_path: Path) -> None:
    names = ["scan-nmap-syn", "bruteforce-ssh", "benign-http-poll", "c2-tcp-beacon", "mixed-home-attacks"]
    _skip_unless_lab_possible(*(t for n in names for t in CATALOGUE[n].tools))
    out = tmp_path / "lab"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "lab", "generate", str(out), "--scenarios",
                             ",".join(names), "--duration-scale", "0.15", "--seed", "3", "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    assert b"5 captures" in stdout and b"MANIFEST.csv" in stdout
    assert _lab_namespaces(proc.pid) == []  # torn down

    with open(out / "MANIFEST.csv", newline="") as f:
        rows = {Path(r["path"]).stem: r for r in csv.DictReader(f)}
    shared = REPO.parent / "shared" / "datasets" / "MANIFEST.csv"
    header = "path,label,family,label_source,note"
    assert (out / "MANIFEST.csv").read_text().splitlines()[0] == header
    if shared.exists():
        assert shared.read_text().splitlines()[0] == header
    assert set(rows) == set(names)
    assert (rows["scan-nmap-syn"]["label"], rows["scan-nmap-syn"]["family"]) == ("attack", "scan")
    assert rows["bruteforce-ssh"]["family"] == "bruteforce"
    assert rows["c2-tcp-beacon"]["family"] == "c2"
    assert (rows["benign-http-poll"]["label"], rows["benign-http-poll"]["family"]) == ("benign", "")
    assert rows["benign-http-poll"]["label_source"] == "whole-capture"
    assert rows["mixed-home-attacks"]["label_source"] == "flow-rules:rules/mixed-home-attacks.csv"
    assert (out / "README.md").read_text().startswith("# iotscan attack-lab captures")

    def flows(name: str) -> list:
        path = out / rows[name]["path"]
        assert path.stat().st_size > 24
        return list(FlowSource(MeterConfig(source=str(path))))

    # The scan: one attacker to many ports of the two devices, nothing else.
    scan = flows("scan-nmap-syn")
    sources = Counter(f.src_ip for f in scan)
    attacker, n = sources.most_common(1)[0]
    assert n >= 0.95 * len(scan)
    assert len({f.dst_port for f in scan if f.src_ip == attacker}) >= 100
    assert len({f.dst_ip for f in scan if f.src_ip == attacker}) == 2
    # SSH guessing: many TCP/22 connections from one address, nDPI sees SSH.
    ssh = flows("bruteforce-ssh")
    assert sum(1 for f in ssh if f.dst_port == 22 and f.protocol == 6) >= 5
    assert any(f.application_name.startswith("SSH") for f in ssh)
    assert len({f.src_ip for f in ssh}) == 1
    # Benign polling: HTTP to port 80 of the devices with basic auth, from LAN addresses only.
    poll = flows("benign-http-poll")
    assert poll and all(f.dst_port == 80 for f in poll)
    assert all(any(ipaddress.ip_address(f.src_ip) in p for p in _PRIVATE) for f in poll)
    # C2: periodic short connections to one controller port.
    c2 = flows("c2-tcp-beacon")
    assert len({(f.dst_ip, f.dst_port) for f in c2}) == 1
    # Mixed: the rules split attack flows from benign ones, and both exist.
    rules = lab_run.read_rules(out / "rules" / "mixed-home-attacks.csv")
    labels = Counter(label_flow(rules, ("benign", ""), f.src_ip, f.dst_ip, f.protocol, f.dst_port)
                     for f in flows("mixed-home-attacks"))
    assert labels[("benign", "")] >= 3
    assert labels[("attack", "scan")] >= 20
    assert {fam for (label, fam) in labels if label == "attack"} <= {"scan", "bruteforce", "c2"}
    # The audit found every flow's label plausible.
    assert "no doubtful flow" in (out / "README.md").read_text()


@pytest.mark.root
def test_sigterm_stops_the_run_and_tears_everything_down(tmp_path: Path) -> None:
    _skip_unless_lab_possible()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "lab", "generate", str(tmp_path / "lab"),
                             "--scenarios", "benign-home", "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "lab" / "logs" / "benign-home.log").exists():
            time.sleep(0.2)
        assert _lab_namespaces(proc.pid), "the lab did not come up"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, stderr.decode()[-1000:]
    assert b"Traceback" not in stderr
    assert _lab_namespaces(proc.pid) == []
    assert not list(Path("/tmp").glob(f"iotlab-{proc.pid}-*"))
