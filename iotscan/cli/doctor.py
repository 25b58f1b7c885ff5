"""`iotscan doctor`: is everything iotscan needs here, and if not, what to run."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.markup import escape

from iotscan.capture.source import PRIVILEGE_FIX
from iotscan.cli import app
from iotscan.errors import ExitCode, IotscanError
from iotscan.live import interface_state, list_interfaces, probe_capture

_REINSTALL = "reinstall iotscan (./install.sh, or pip install --force-reinstall iotscan)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    code: ExitCode = ExitCode.OK  # the exit code this check's failure maps to
    warning: bool = False  # worth a look, but iotscan works


def check_engine() -> Check:
    try:
        import nfstream
        from nfstream.engine import create_engine

        ffi, lib = create_engine()
        if lib is None:
            raise ImportError("the engine library did not load")
        pcap = ffi.string(lib.engine_lib_pcap_version()).decode()
        ndpi = ffi.string(lib.engine_lib_ndpi_version()).decode()
    except Exception as exc:  # any failure to load the native engine is the finding itself
        return Check("libpcap", False, f"NFStream's engine (libpcap, nDPI) does not load: {exc}", _REINSTALL,
                     ExitCode.CAPTURE)
    return Check("libpcap", True, f"{pcap}; nDPI {ndpi}; NFStream {nfstream.__version__}")


def check_privileges(interface: str = "lo") -> Check:
    user = f"uid {os.geteuid()}"
    try:
        probe_capture(interface)
    except IotscanError as exc:
        message = exc.message
        fix = PRIVILEGE_FIX if PRIVILEGE_FIX in message else ""
        message = message.replace(PRIVILEGE_FIX, "").removeprefix(f"{interface}: ").strip().rstrip(".")
        return Check("privileges", False, f"cannot capture on {interface} as {user}: {message}", fix,
                     ExitCode.CAPTURE)
    return Check("privileges", True, f"capturing on {interface} works ({user})")


def check_interfaces() -> Check:
    names = list_interfaces()
    if not names:
        return Check("interfaces", False, "no network interface found", "check /sys/class/net",
                     ExitCode.CAPTURE)
    states = {name: interface_state(name) for name in names}
    listed = ", ".join(f"{n} ({s})" if s else n for n, s in states.items())
    watchable = [n for n, s in states.items() if n != "lo" and s in ("up", "unknown")]
    if not watchable:
        return Check("interfaces", True, f"{listed}; no interface but loopback is up: nothing else to watch",
                     "bring an interface up (ip link set IFACE up) or plug in the mirror port", warning=True)
    return Check("interfaces", True, listed)


# The models the stages load: the device fingerprinter's and the flow classifier's.
EXPECTED_MODELS = ("devices", "flows")


def check_models() -> list[Check]:
    from iotscan.detect import modelstore

    directory = modelstore.models_dir()
    present = {p.stem for p in directory.glob("*.joblib")} if directory.is_dir() else set()
    checks = []
    for name in (*EXPECTED_MODELS, *sorted(present - set(EXPECTED_MODELS))):
        path = modelstore.bundled_model(name)
        label = f"model {name}"
        if name not in present:
            checks.append(Check(label, False, f"not bundled: {path} is missing", f"{_REINSTALL}; or train it "
                                f"(see `iotscan model --help`, `iotscan devices --help`)", ExitCode.MODEL))
            continue
        try:
            expected = modelstore.read_card(path).get("sha256")
            actual = modelstore.sha256_file(path)
        except (IotscanError, OSError) as exc:
            checks.append(Check(label, False, str(exc), _REINSTALL, ExitCode.MODEL))
            continue
        if expected != actual:
            checks.append(Check(label, False, f"SHA-256 {actual[:16]}... does not match its card "
                                f"({str(expected)[:16]}...): tampered or damaged, iotscan refuses to load it",
                                _REINSTALL, ExitCode.MODEL))
        else:
            checks.append(Check(label, True, f"SHA-256 verified ({actual[:16]}...)"))
    return checks


def check_tshark() -> Check:
    fix = "sudo apt-get install tshark (only `iotscan inspect` needs it)"
    path = shutil.which("tshark")
    if path is None:
        return Check("tshark", False, "not found on PATH", fix, ExitCode.FINDINGS)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=20, check=False)
        first = out.stdout.decode(errors="replace").splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("tshark", False, f"{path} does not run: {exc}", fix, ExitCode.FINDINGS)
    if out.returncode != 0 or not first:
        return Check("tshark", False, f"{path} --version failed (exit {out.returncode})", fix,
                     ExitCode.FINDINGS)
    return Check("tshark", True, f"{first} ({path})")


@app.command()
def doctor(
    interface: str = typer.Option("lo", "--interface", "-i", help="Interface to test capturing on."),
) -> None:
    """Check what iotscan needs: libpcap, capture privileges, interfaces, bundled models, tshark.

    Prints one line per check and, for each problem, what to run. Exit code: 0 when all is well;
    otherwise the highest of 1 (tshark missing: only `inspect` is affected), 3 (live capture cannot
    work: engine, privileges or interfaces) and 4 (bundled models missing or failing their SHA-256
    check).
    """
    console = Console(highlight=False, soft_wrap=True)
    engine = check_engine()
    checks = [engine]
    if engine.ok:
        checks.append(check_privileges(interface))
    checks += [check_interfaces(), *check_models(), check_tshark()]
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "[green] ok [/]" if c.ok and not c.warning else "[yellow]warn[/]" if c.ok else "[red]FAIL[/]"
        console.print(f"[{mark}] {c.name.ljust(width)}  {escape(c.detail)}")
        if c.fix and (not c.ok or c.warning):
            console.print(f"       {' ' * width}  fix: {escape(c.fix)}")
    code = max((c.code for c in checks if not c.ok), default=ExitCode.OK)
    console.print("All good." if code == ExitCode.OK else f"Problems found (exit {int(code)}).")
    raise typer.Exit(int(code))
