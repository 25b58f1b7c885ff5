"""The victim services: what makes the lab's namespaces look like IoT devices and their cloud.

Each LAN has a hub (MQTT broker, CoAP, web panel, telnet on 23 and 2323, SSH) and a camera
(CoAP, web panel, telnet, SSH); the WAN has the vendor cloud (DNS, NTP, MQTT, firmware
downloads). Credentials are IoT defaults drawn from the seed, sometimes in the attackers'
word list and sometimes not, so some brute-force runs succeed and some do not.

Telnet logins go to a fake login script and SSH logins to an account that exists only inside
the SSH server's own mount namespace (passwd and shadow are bind-mounted there): guessing
never touches the host's accounts.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import iotscan
from iotscan.errors import CaptureError
from iotscan.lab.netns import LAN_SEGMENTS, Host, Lab

# The Mirai botnet's telnet credential list (its source, 2016), the classic IoT default passwords.
MIRAI_CREDENTIALS: tuple[tuple[str, str], ...] = (
    ("root", "xc3511"), ("root", "vizxv"), ("root", "admin"), ("admin", "admin"), ("root", "888888"),
    ("root", "xmhdipc"), ("root", "default"), ("root", "juantech"), ("root", "123456"), ("root", "54321"),
    ("support", "support"), ("root", ""), ("admin", "password"), ("root", "root"), ("root", "12345"),
    ("user", "user"), ("admin", ""), ("root", "pass"), ("admin", "admin1234"), ("root", "1111"),
    ("admin", "smcadmin"), ("admin", "1111"), ("root", "666666"), ("root", "password"), ("root", "1234"),
    ("root", "klv123"), ("Administrator", "admin"), ("service", "service"), ("supervisor", "supervisor"),
    ("guest", "guest"), ("guest", "12345"), ("admin1", "password"), ("administrator", "1234"),
    ("666666", "666666"), ("888888", "888888"), ("ubnt", "ubnt"), ("root", "klv1234"), ("root", "Zte521"),
    ("root", "hi3518"), ("root", "jvbzd"), ("root", "anko"), ("root", "zlxx."), ("root", "7ujMko0vizxv"),
    ("root", "7ujMko0admin"), ("root", "system"), ("root", "ikwb"), ("root", "dreambox"), ("root", "user"),
    ("root", "realtek"), ("root", "00000000"), ("admin", "1111111"), ("admin", "1234"), ("admin", "12345"),
    ("admin", "54321"), ("admin", "123456"), ("admin", "7ujMko0admin"), ("admin", "pass"), ("admin", "meinsm"),
    ("tech", "tech"),
)
# Common passwords attackers add to it (tried for admin and root).
COMMON_PASSWORDS = ("admin123", "12345678", "password1", "qwerty", "letmein", "changeme", "toor", "raspberry",
                    "1234567890", "111111", "abc123", "welcome", "000000", "admin@123", "Admin123", "P@ssw0rd",
                    "iot123", "camera", "hikvision", "dahua")
# Device passwords not in that list: a run against them finds nothing.
_STRONG_PASSWORDS = ("Gr33nhouse!42", "k7#pLq2vZ", "hub-2f9c1e", "Cam@Porch2023", "t0ps3cret-IoT")

_HUB_MODELS = (("SmartHub Pro 2", "Boa/0.94.14rc21", "2.4.17"), ("ZigBee Gateway ZG-200", "lighttpd/1.4.35",
               "1.0.8_20210311"), ("HomeBridge Mini", "mini_httpd/1.19 19dec2003", "3.1.2"))
_CAM_MODELS = (("IPC-HFW1320S", "GoAhead-Webs", "V5.5.2.3"), ("NetCam 720P", "uc-httpd 1.0.0", "V4.02.R11"),
               ("WiFi Cam C200", "Boa/0.94.13", "1.1.15 Build 211230"))

# Names the devices look up; the lab's DNS answers them all with the cloud's address.
CLOUD_NAMES = ("pool.ntp.org", "time.nist.gov", "devs.tplinkcloud.com", "api.meethue.com", "a2.tuyaus.com",
               "mqtt.iot-vendor-cloud.com", "fw.iot-vendor-cloud.com", "connectivitycheck.gstatic.com",
               "ota.camera-cloud.net", "log.iot-vendor-cloud.com")


@dataclass(frozen=True)
class Device:
    """One victim device: its host, look, and credentials."""

    host: Host
    model: str
    server: str
    firmware: str
    http: tuple[str, str]
    telnet: tuple[str, str]
    ssh: tuple[str, str]
    mqtt_broker: bool
    mqtt: tuple[str, str] = ("", "")  # account the LAN's sensors publish with (brokers only)


@dataclass
class Services:
    """What the scenarios need to know about the running services."""

    devices: dict[str, Device] = field(default_factory=dict)  # role -> device
    cloud: Host | None = None
    cloud_mqtt: tuple[str, str] = ("", "")
    logs: dict[str, Path] = field(default_factory=dict)

    def device(self, segment: str, kind: str) -> Device:
        return self.devices[f"{segment}-{kind}"]


def agent_env() -> dict[str, str]:
    """Environment for `python -m iotscan.lab.agents` inside a namespace: this iotscan on the path."""
    root = str(Path(iotscan.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


def agent_argv(name: str, *args: Any) -> list[str]:
    return [sys.executable, "-m", "iotscan.lab.agents", name, *map(str, args)]


def _pick_password(rng: random.Random, weak: float) -> tuple[str, str]:
    if rng.random() < weak:
        user, password = rng.choice([c for c in MIRAI_CREDENTIALS if c[1]])
        return user, password
    return rng.choice(["admin", "root", "user"]), rng.choice(_STRONG_PASSWORDS)


def plan_devices(lab: Lab, seed: int) -> dict[str, Device]:
    rng = random.Random(f"iotscan-lab-devices:{seed}")
    devices: dict[str, Device] = {}
    for segment in LAN_SEGMENTS:
        for kind, models in (("hub", _HUB_MODELS), ("cam", _CAM_MODELS)):
            model, server, firmware = rng.choice(models)
            devices[f"{segment}-{kind}"] = Device(
                host=lab.plan.host(f"{segment}-{kind}"), model=model, server=server, firmware=firmware,
                http=_pick_password(rng, 0.7), telnet=_pick_password(rng, 0.7), ssh=_pick_password(rng, 0.5),
                mqtt_broker=kind == "hub",
                mqtt=(f"sensor{rng.randrange(10, 99)}", f"mq-{rng.randrange(16**8):08x}") if kind == "hub"
                else ("", ""))
    return devices


_LOGIN_SCRIPT = """#!/bin/sh
# A device's telnet login: one try per connection, as many small devices do; never a real shell.
while :; do
  printf '\\r\\n%s login: ' "{hostname}"
  read -r user || exit 0
  [ -n "$user" ] && break
done
stty -echo 2>/dev/null
printf 'Password: '
read -r pass || exit 0
stty echo 2>/dev/null
printf '\\r\\n'
if [ "$user" = {user} ] && [ "$pass" = {password} ]; then
  printf '\\r\\n\\r\\nBusyBox v1.19.4 (2016-03-02 11:24:38 CST) built-in shell (ash)\\r\\n'
  printf 'Enter help for a list of built-in commands.\\r\\n\\r\\n# '
  n=0
  while [ $n -lt 5 ] && read -r cmd; do
    printf '%s: applet not found\\r\\n# ' "${{cmd%% *}}"
    n=$((n+1))
  done
  exit 0
fi
sleep 0.3
printf 'Login incorrect\\r\\n'
"""


class ServiceStarter:
    """Starts every service, then waits until each one listens."""

    def __init__(self, lab: Lab, seed: int) -> None:
        self.lab = lab
        self.seed = seed
        self.services = Services()
        self.logdir = lab.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._expect: list[tuple[str, str, int, str]] = []  # role, "tcp"/"udp", port, log name

    def _spawn(self, role: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.logdir / f"{role}-{name}.log"
        self.services.logs[f"{role}-{name}"] = log
        with open(log, "ab") as out:
            self.lab.spawn(role, argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def _run(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise CaptureError(f"`{' '.join(argv[:2])}` failed: {proc.stderr.strip()[:300]}")

    def start(self) -> Services:
        rng = random.Random(f"iotscan-lab-services:{self.seed}")
        self.services.devices = plan_devices(self.lab, self.seed)
        for device in self.services.devices.values():
            self._device(device, rng)
        self._cloud(rng)
        self._wait_ready()
        return self.services

    def _device(self, device: Device, rng: random.Random) -> None:
        role, ip = device.host.role, str(device.host.ip)
        home = self.lab.workdir / role
        home.mkdir()
        env = agent_env()
        self._spawn(role, "panel", agent_argv("http-panel", "--bind", ip, "--port", 80, "--user", device.http[0],
                                              "--password", device.http[1], "--model", device.model, "--server",
                                              device.server, "--fw", device.firmware, "--seed", rng.randrange(1 << 30),
                                              "--deadline", 86400), env=env)
        self._expect.append((role, "tcp", 80, "panel"))
        # Telnet on 23 and 2323, as on the cameras and DVRs Mirai went after.
        hostname = device.model.split()[0].lower()
        login = home / "login.sh"
        login.write_text(_LOGIN_SCRIPT.format(hostname=hostname, user=shlex.quote(device.telnet[0]),
                                              password=shlex.quote(device.telnet[1])))
        login.chmod(0o755)
        issue = home / "issue"
        issue.write_text(f"{device.model}\n")
        for port in (23, 2323):
            self._spawn(role, f"telnetd-{port}", ["busybox", "telnetd", "-F", "-p", str(port), "-b", ip,
                                                   "-f", str(issue), "-l", str(login)])
            self._expect.append((role, "tcp", port, f"telnetd-{port}"))
        self._ssh(device, home)
        self._spawn(role, "coap", ["coap-server-notls", "-A", ip, "-p", "5683", "-v", "0"])
        self._expect.append((role, "udp", 5683, "coap"))
        if device.mqtt_broker:
            self._mosquitto(role, ip, home, [device.mqtt, device.http])

    def _ssh(self, device: Device, home: Path) -> None:
        key = home / "dropbear_ed25519_host_key"
        self._run(["dropbearkey", "-t", "ed25519", "-f", str(key)])
        user, password = device.ssh
        hashed = subprocess.run(["openssl", "passwd", "-6", "-salt", device.host.role.replace("-", ""),
                                 "-stdin"], input=password, capture_output=True, text=True, timeout=10).stdout.strip()
        if not hashed.startswith("$6$"):
            raise CaptureError("openssl could not hash the lab's SSH password")
        passwd, shadow = home / "passwd", home / "shadow"
        passwd.write_text(f"root:x:0:0:root:/root:/bin/sh\n{user}:x:4242:4242:{user}:/tmp:/bin/sh\n"
                          if user != "root" else "root:x:0:0:root:/root:/bin/sh\n")
        shadow.write_text(f"{user}:{hashed}:19000:0:99999:7:::\n" + ("root:*:19000:0:99999:7:::\n"
                                                                   if user != "root" else ""))
        shadow.chmod(0o600)
        # The account exists only in this server's mount namespace: the host's passwd is not touched.
        script = (f"mount --bind {passwd} /etc/passwd && mount --bind {shadow} /etc/shadow && "
                  f"exec dropbear -F -E -p {device.host.ip}:22 -r {key}")
        self._spawn(device.host.role, "dropbear", ["unshare", "--mount", "--propagation", "private",
                                                   "sh", "-c", script])
        self._expect.append((device.host.role, "tcp", 22, "dropbear"))

    def _mosquitto(self, role: str, ip: str, home: Path, accounts: list[tuple[str, str]]) -> None:
        passwords = home / "mosquitto.passwd"
        for i, (user, password) in enumerate(accounts):
            self._run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwords), user, password])
        config = home / "mosquitto.conf"
        config.write_text(f"listener 1883 {ip}\nallow_anonymous false\npassword_file {passwords}\n"
                          "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nuser root\n")
        self._spawn(role, "mosquitto", ["mosquitto", "-c", str(config)])
        self._expect.append((role, "tcp", 1883, "mosquitto"))

    def _cloud(self, rng: random.Random) -> None:
        cloud = self.lab.plan.host("cloud")
        self.services.cloud = cloud
        ip = str(cloud.ip)
        home = self.lab.workdir / "cloud"
        home.mkdir()
        records = [f"--host-record={name},{ip}" for name in CLOUD_NAMES]
        self._spawn("cloud", "dnsmasq", ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                                         "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={ip}",
                                         "--port=53", "--pid-file=", "--user=root", "--group=root",
                                         "--log-facility=-", *records])
        self._expect.append(("cloud", "udp", 53, "dnsmasq"))
        env = agent_env()
        self._spawn("cloud", "ntp", agent_argv("ntp-server", "--bind", ip, "--deadline", 86400), env=env)
        self._expect.append(("cloud", "udp", 123, "ntp"))
        self._spawn("cloud", "firmware", agent_argv("http-panel", "--bind", ip, "--port", 80, "--firmware",
                                                    "--model", "update server", "--server", "nginx/1.18.0",
                                                    "--user", "ops", "--password", f"{rng.randrange(16**12):012x}",
                                                    "--deadline", 86400), env=env)
        self._expect.append(("cloud", "tcp", 80, "firmware"))
        self.services.cloud_mqtt = (f"dev{rng.randrange(1000, 9999)}", f"{rng.randrange(16**10):010x}")
        self._mosquitto("cloud", ip, home, [self.services.cloud_mqtt])

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self._expect)
        while pending and time.monotonic() < deadline:
            listening: dict[tuple[str, str], set[int]] = {}
            still = []
            for role, proto, port, name in pending:
                key = (role, proto)
                if key not in listening:
                    listening[key] = self._listening(role, proto)
                if port not in listening[key]:
                    still.append((role, proto, port, name))
            pending = still
            if pending:
                time.sleep(0.2)
        if pending:
            role, proto, port, name = pending[0]
            log = self.services.logs.get(f"{role}-{name}")
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
            raise CaptureError(f"lab service {name} in {role} is not listening on {proto}/{port} after "
                               f"{timeout:.0f}s" + (f": {tail[0][:200]}" if tail else ""))

    def _listening(self, role: str, proto: str) -> set[int]:
        flag = "-Htln" if proto == "tcp" else "-Huln"
        proc = subprocess.run(self.lab.command(role, ["ss", flag]), capture_output=True, text=True, timeout=10)
        ports = set()
        for line in proc.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 4 and ":" in fields[3]:
                ports.add(int(fields[3].rsplit(":", 1)[1]))
        return ports
