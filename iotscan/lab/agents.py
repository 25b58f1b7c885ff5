"""Small programs the lab runs inside its namespaces: ``python -m iotscan.lab.agents NAME ...``.

Standard library only (they start fast and need nothing from the rest of iotscan). Each one is
bounded: clients stop after ``--count`` actions or ``--deadline`` seconds, whichever comes first;
servers stop after ``--deadline`` seconds or when the lab stops them.

The device panel *looks* vulnerable (a ping CGI, a download CGI, the URLs IoT exploits aim at) so
that exploit scenarios get the answers a real device would give; it never runs a command and
never reads a file a request names: every answer is canned.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from urllib.request import HTTPBasicAuthHandler, HTTPPasswordMgrWithDefaultRealm, Request, build_opener, urlopen

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 to 1970


def _paced(rng: random.Random, count: int, interval: float, jitter: float, deadline: float) -> Iterator[int]:
    """Yield 0..count-1, sleeping interval*(1±jitter) between, until count or the deadline."""
    end = time.monotonic() + deadline
    for i in range(count):
        if time.monotonic() >= end:
            return
        yield i
        pause = max(0.0, interval * (1 + rng.uniform(-jitter, jitter)))
        if time.monotonic() + pause >= end:
            return
        time.sleep(pause)


# -- HTTP device panel and firmware server ------------------------------------------------------

_FAKE_PASSWD = (b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
                b"admin:x:1000:1000::/home:/bin/sh\n")
_EXPLOIT_PATHS = ("/shell", "/GponForm/diag_Form", "/HNAP1/", "/setup.cgi", "/boaform/admin/formLogin",
                  "/cgi-bin/luci/", "/tmUnblock.cgi", "/apply.cgi", "/goform/set_LimitClient_cfg",
                  "/cgi-bin/config.exp", "/command.php", "/device.rsp")


def _panel_handler(args: argparse.Namespace) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
    rng = random.Random(args.seed)
    started = time.time()

    class Panel(BaseHTTPRequestHandler):
        server_version = args.server
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = 30  # an idle or slow client is dropped after this, as small devices do

        def log_message(self, format: str, *a: object) -> None:  # keep stderr quiet
            return

        def _send(self, code: int, body: bytes, ctype: str = "text/html", extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == expected

        def _deny(self) -> None:
            body = b"<html><body><h1>401 Unauthorized</h1></body></html>"
            self._send(401, body, extra={"WWW-Authenticate": f'Basic realm="{args.model}"'})

        def _firmware(self, path: str) -> None:
            # /firmware/<name>-<bytes>.bin: a pseudo-random image of that size, streamed.
            try:
                size = min(int(path.rsplit("-", 1)[1].split(".", 1)[0]), 64 * 1024 * 1024)
            except (IndexError, ValueError):
                self._send(404, b"not found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = random.Random(size).randbytes(65536)
            sent = 0
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                self.wfile.write(piece)
                sent += len(piece)

        def _bins(self, path: str) -> None:
            # /bins/NAME: what an IoT botnet's loader fetches: an ELF header and 40 to 160 KB of random bytes
            # (never a program: nothing is ever run from it)
            body = b"\x7fELF\x01\x01\x01" + random.Random(path).randbytes(rng.randrange(40_000, 160_000))
            self._send(200, body, "application/octet-stream")

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length") or 0), 65536)
            if length:
                self.rfile.read(length)
            self.do_GET()

        def do_GET(self) -> None:
            raw = self.path
            parts = urlsplit(raw)
            path, query = unquote(parts.path), parse_qs(parts.query)
            if args.firmware and path.startswith("/firmware/"):
                self._firmware(path)
                return
            if args.firmware and path.startswith("/bins/"):
                self._bins(path)
                return
            if ".." in raw or "%2e%2e" in raw.lower() or path.startswith("/cgi-bin/download"):
                name = (query.get("file") or [path])[0]
                if ".." in name or "passwd" in name or "shadow" in name:
                    self._send(200, _FAKE_PASSWD, "text/plain")
                else:
                    self._send(404, b"<html><body>404 Not Found</body></html>")
                return
            if path.startswith("/cgi-bin/ping"):
                host = (query.get("host") or query.get("ip") or ["127.0.0.1"])[0][:200]
                body = (f"PING {host} (127.0.0.1): 56 data bytes\n64 bytes from 127.0.0.1: seq=0 ttl=64 "
                        f"time=0.1 ms\n--- ping statistics ---\n1 packets transmitted, 1 received\n").encode()
                self._send(200, body, "text/plain")
                return
            if any(path.startswith(p) for p in _EXPLOIT_PATHS):
                self._send(200, b"<html><body>OK</body></html>")
                return
            if path in ("/", "/index.html", "/status.json", "/snapshot.jpg", "/api/v1/state"):
                if not self._authorized():
                    self._deny()
                    return
                if path == "/status.json" or path == "/api/v1/state":
                    state = {"model": args.model, "fw": args.fw, "uptime": int(time.time() - started),
                             "temp": round(rng.uniform(18, 31), 1), "rssi": rng.randint(-80, -40),
                             "on": rng.random() < 0.5}
                    self._send(200, json.dumps(state).encode(), "application/json")
                elif path == "/snapshot.jpg":
                    body = b"\xff\xd8\xff\xe0" + rng.randbytes(rng.randint(15000, 60000)) + b"\xff\xd9"
                    self._send(200, body, "image/jpeg")
                else:
                    body = (f"<html><head><title>{args.model}</title></head><body><h1>{args.model}</h1>"
                            f"<p>Firmware {args.fw}</p><a href='/status.json'>status</a></body></html>").encode()
                    self._send(200, body)
                return
            self._send(404, b"<html><body>404 Not Found</body></html>")

    return Panel


def cmd_http_panel(args: argparse.Namespace) -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 64
    server = ThreadingHTTPServer((args.bind, args.port), _panel_handler(args))
    _serve_until(server.serve_forever, server.shutdown, args.deadline)


def _serve_until(serve: Callable[[], None], shutdown: Callable[[], None], deadline: float) -> None:
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(timeout=deadline)
    shutdown()


# -- NTP -----------------------------------------------------------------------------------------

def _ntp_time(t: float) -> bytes:
    secs = int(t) + NTP_EPOCH_OFFSET
    return struct.pack("!II", secs, int((t % 1) * 2**32))


def cmd_ntp_server(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, 123))
    sock.settimeout(1.0)
    end = time.monotonic() + args.deadline
    while time.monotonic() < end:
        try:
            data, peer = sock.recvfrom(512)
        except TimeoutError:
            continue
        if len(data) < 48:
            continue
        now = time.time()
        reply = (bytes([0x24, 2, data[2], 0xEC]) + struct.pack("!II", 0x200, 0x400) + b"GPS\x00"
                 + _ntp_time(now - 30) + data[40:48] + _ntp_time(now) + _ntp_time(time.time()))
        sock.sendto(reply, peer)


def cmd_ntp_client(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    for _ in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            packet = bytes([0x23, 0, 6, 0xEC]) + bytes(36) + _ntp_time(time.time())
            sock.sendto(packet, (args.server, 123))
            with contextlib.suppress(TimeoutError, OSError):
                sock.recvfrom(512)


# -- DNS client (the lab's dnsmasq answers) ---------------------------------------------------------

def _dns_query(rng: random.Random, name: str, qtype: int) -> bytes:
    header = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def cmd_dns_client(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    names = args.names.split(",")
    for _ in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
        name = rng.choice(names)
        qtype = 28 if rng.random() < 0.2 else 1  # mostly A, sometimes AAAA
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(_dns_query(rng, name, qtype), (args.server, 53))
            with contextlib.suppress(TimeoutError, OSError):
                sock.recvfrom(2048)


def cmd_cloud_checkin(args: argparse.Namespace) -> None:
    """A device calling home: resolve its cloud's name, then ask it for its update manifest by that name."""
    rng = random.Random(args.seed)
    for i in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(_dns_query(rng, args.name, 1), (args.dns, 53))
            with contextlib.suppress(TimeoutError, OSError):
                sock.recvfrom(2048)
        request = Request(f"http://{args.server}/firmware/manifest-{args.device}-{1024 + 64 * (i % 4)}.bin",
                          headers={"Host": args.name, "User-Agent": args.user_agent})
        with contextlib.suppress(OSError), urlopen(request, timeout=5) as resp:
            resp.read()


# -- HTTP polling (an app or hub reading device state) --------------------------------------------

def cmd_http_poll(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    passwords = HTTPPasswordMgrWithDefaultRealm()
    for url in args.url:
        passwords.add_password(None, url, args.user, args.password)
    opener = build_opener(HTTPBasicAuthHandler(passwords))
    opener.addheaders = [("User-Agent", args.user_agent)]
    for i in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
        base = rng.choice(args.url)
        path = "/snapshot.jpg" if args.snapshot_every and i % args.snapshot_every == args.snapshot_every - 1 \
            else rng.choice(["/status.json", "/status.json", "/api/v1/state", "/"])
        with contextlib.suppress(OSError), opener.open(base.rstrip("/") + path, timeout=5) as resp:
            resp.read()


# -- MQTT sensors and MQTT password guessing (with the mosquitto clients) ------------------------

def cmd_mqtt_sensor(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    auth = ["-h", args.host, "-u", args.user, "-P", args.password, "-q", str(args.qos)]

    def reading(i: int) -> str:
        return json.dumps({"id": args.client_id, "seq": i, "t": round(20 + rng.gauss(0, 2), 2),
                           "h": round(45 + rng.gauss(0, 5), 1), "bat": max(0, 100 - i // 10)})

    if args.mode == "per-message":  # a battery sensor: wake, connect, publish, disconnect
        for i in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["mosquitto_pub", *auth, "-i", f"{args.client_id}-{i}", "-t", args.topic,
                                "-m", reading(i)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        return
    pub = subprocess.Popen(["mosquitto_pub", *auth, "-i", args.client_id, "-t", args.topic, "-l",
                            "-k", str(args.keepalive)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        assert pub.stdin is not None
        for i in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
            pub.stdin.write(reading(i) + "\n")
            pub.stdin.flush()
        pub.stdin.close()
        pub.wait(timeout=5)
    except (BrokenPipeError, subprocess.TimeoutExpired):
        pass
    finally:
        if pub.poll() is None:
            pub.terminate()


def cmd_mqtt_brute(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with open(args.creds) as f:
        creds = [line.rstrip("\n").split(":", 1) for line in f if ":" in line]
    for i in _paced(rng, min(args.count, len(creds)), args.interval, args.jitter, args.deadline):
        user, password = creds[i]
        with contextlib.suppress(subprocess.TimeoutExpired):
            done = subprocess.run(["mosquitto_pub", "-h", args.host, "-u", user, "-P", password,
                                   "-i", f"mqtt-{rng.randrange(1 << 32):08x}", "-t", "test", "-m", "x"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
            if done.returncode == 0:
                print(f"[mqtt] valid credentials {user}:{password}", flush=True)
                if args.stop_on_success:
                    return


# -- CoAP (with libcoap's client) -----------------------------------------------------------------

def cmd_coap_poll(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    for i in _paced(rng, args.count, args.interval, args.jitter, args.deadline):
        uri = rng.choice(args.uri)
        argv = ["coap-client-notls", "-m", "get", "-B", "3", uri]
        if args.observe_every and i % args.observe_every == args.observe_every - 1:
            argv = ["coap-client-notls", "-m", "get", "-s", str(args.observe_seconds), "-B",
                    str(args.observe_seconds + 2), uri]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=args.observe_seconds + 5)


# -- C2: a controller and bots, over a plain TCP beacon protocol or an IRC-like channel -----------

_C2_COMMANDS = ("NOP", "NOP", "SLEEP 30", "UPDATE http://{cnc}/bins/arm7", "SCAN {lan} 23,2323",
                "ATTACK UDP {lan} 30", "KILL telnetd", "PERSIST")


class _Lines:
    """Lines from a socket with a receive timeout (a socket file object breaks after a timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def readline(self) -> str | None:
        """The next line without its end; None on timeout; "" when the peer closed."""
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return None
            if not data:
                return ""
            self.buffer += data
            if len(self.buffer) > 65536:
                return ""
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace").rstrip("\r") or " "


def cmd_c2_server(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    commands = [c.format(cnc=args.bind, lan=args.lan) for c in _C2_COMMANDS]
    end = time.monotonic() + args.deadline

    class Beacon(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(10)
            lines = _Lines(self.request)
            with contextlib.suppress(OSError):
                if not lines.readline():
                    return
                self.request.sendall((rng.choice(commands) + "\n").encode())
                lines.readline()

    class Irc(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(0.5)
            lines = _Lines(sock)
            nick, joined, last_ping, pings = "bot", False, time.monotonic(), 0
            with contextlib.suppress(OSError):
                while time.monotonic() < end:
                    line = lines.readline()
                    if line == "":
                        return
                    line = (line or "").strip()
                    if line.startswith("NICK "):
                        nick = line.split()[1]
                        sock.sendall(f":irc.local 001 {nick} :Welcome to the network\r\n".encode())
                    elif line.startswith("JOIN "):
                        joined = True
                        sock.sendall(f":{nick}!x@bot JOIN {args.channel}\r\n"
                                     f":irc.local 332 {nick} {args.channel} :!idle\r\n".encode())
                    elif line.startswith("QUIT"):
                        return
                    if joined and time.monotonic() - last_ping >= args.interval:
                        last_ping, pings = time.monotonic(), pings + 1
                        sock.sendall(f"PING :{rng.randrange(10**9)}\r\n".encode())
                        if pings % 2 == 0:
                            command = rng.choice(commands).lower()
                            sock.sendall(f":boss!boss@cnc PRIVMSG {args.channel} :!{command}\r\n".encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    server = socketserver.ThreadingTCPServer((args.bind, args.port), Irc if args.mode == "irc" else Beacon)
    _serve_until(server.serve_forever, server.shutdown, args.deadline)


def cmd_c2_bot(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    arch = rng.choice(["arm7", "mips", "mpsl", "x86"])
    start = time.monotonic()
    end = start + args.deadline
    if args.mode == "tcp":
        for i in range(args.count):
            # Fixed ticks, not sleeps after the work: a beacon's steady period is what gives it away.
            tick = start + i * args.interval
            if tick >= end:
                return
            time.sleep(max(0.0, tick - time.monotonic()))
            with contextlib.suppress(OSError), socket.create_connection((args.server, args.port), timeout=5) as s:
                s.sendall(f"HELLO {args.bot_id} {arch} seq={i}\n".encode())
                command = (_Lines(s).readline() or "").strip()
                s.sendall(f"OK {command.split(' ', 1)[0] if command else 'NONE'}\n".encode())
        return
    with contextlib.suppress(OSError), socket.create_connection((args.server, args.port), timeout=5) as s:
        s.settimeout(1.0)
        lines = _Lines(s)
        s.sendall(f"NICK {arch.upper()}|{args.bot_id}\r\nUSER {args.bot_id} 0 * :{arch}\r\n".encode())
        s.sendall(f"JOIN {args.channel}\r\n".encode())
        pongs = 0
        while time.monotonic() < end and pongs < args.count:
            line = lines.readline()
            if line is None:
                continue
            if line == "":
                return
            if line.startswith("PING"):
                s.sendall(("PONG" + line[4:] + "\r\n").encode())
                pongs += 1
            elif "PRIVMSG" in line and ":!" in line:
                command = line.split(":!", 1)[1]
                s.sendall(f"PRIVMSG {args.channel} :[{arch}] {command.split(' ', 1)[0]} ok\r\n".encode())
        s.sendall(b"QUIT :bye\r\n")


# -- entry point ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iotscan.lab.agents")
    sub = parser.add_subparsers(dest="agent", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], None], client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--deadline", type=float, default=60.0, help="hard stop, seconds")
        p.add_argument("--seed", type=int, default=0)
        if client:
            p.add_argument("--count", type=int, default=10)
            p.add_argument("--interval", type=float, default=1.0)
            p.add_argument("--jitter", type=float, default=0.3)
        return p

    p = add("http-panel", cmd_http_panel, client=False)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--user", default="admin")
    p.add_argument("--password", default="admin")
    p.add_argument("--model", default="IP Camera")
    p.add_argument("--fw", default="V5.5.2.3")
    p.add_argument("--server", default="GoAhead-Webs")
    p.add_argument("--firmware", action="store_true", help="also serve /firmware/NAME-BYTES.bin")

    p = add("ntp-server", cmd_ntp_server, client=False)
    p.add_argument("--bind", required=True)
    p = add("ntp-client", cmd_ntp_client)
    p.add_argument("--server", required=True)
    p = add("dns-client", cmd_dns_client)
    p.add_argument("--server", required=True)
    p.add_argument("--names", required=True)

    p = add("cloud-checkin", cmd_cloud_checkin)
    p.add_argument("--dns", required=True, help="the DNS server")
    p.add_argument("--server", required=True, help="the cloud's address")
    p.add_argument("--name", required=True, help="the cloud's name")
    p.add_argument("--device", default="cam")
    p.add_argument("--user-agent", default="cam-ota/1.0")

    p = add("http-poll", cmd_http_poll)
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--user-agent", default="okhttp/4.9.2")

    p = add("mqtt-sensor", cmd_mqtt_sensor)
    p.add_argument("--host", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--qos", type=int, default=0)
    p.add_argument("--keepalive", type=int, default=60)
    p.add_argument("--mode", choices=["persistent", "per-message"], default="persistent")

    p = add("mqtt-brute", cmd_mqtt_brute)
    p.add_argument("--host", required=True)
    p.add_argument("--creds", required=True, help="file of user:password lines")
    p.add_argument("--stop-on-success", action="store_true")

    p = add("coap-poll", cmd_coap_poll)
    p.add_argument("--uri", action="append", required=True)
    p.add_argument("--observe-every", type=int, default=0)
    p.add_argument("--observe-seconds", type=int, default=10)

    p = add("c2-server", cmd_c2_server, client=False)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["tcp", "irc"], default="tcp")
    p.add_argument("--interval", type=float, default=10.0, help="IRC: seconds between PINGs")
    p.add_argument("--channel", default="#bots")
    p.add_argument("--lan", default="192.168.1.0/24", help="network named in the commands it sends")

    p = add("c2-bot", cmd_c2_bot)
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["tcp", "irc"], default="tcp")
    p.add_argument("--bot-id", default="b0")
    p.add_argument("--channel", default="#bots")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        args.func(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
