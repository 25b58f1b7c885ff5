"""The programs the lab runs and the Debian packages that provide them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

# program -> Debian 12 package. Servers among them (mosquitto, dropbear, dnsmasq) run only inside
# the lab's namespaces; install.sh keeps their host services off.
TOOL_PACKAGES: dict[str, str] = {
    "ip": "iproute2",
    "ss": "iproute2",
    "sysctl": "procps",
    "ethtool": "ethtool",
    "unshare": "util-linux",
    "tcpdump": "tcpdump",
    "openssl": "openssl",
    "curl": "curl",
    "mosquitto": "mosquitto",
    "mosquitto_pub": "mosquitto-clients",
    "mosquitto_sub": "mosquitto-clients",
    "mosquitto_passwd": "mosquitto",
    "coap-server-notls": "libcoap3-bin",
    "coap-client-notls": "libcoap3-bin",
    "busybox": "busybox-static",  # Debian's dynamic busybox has no telnetd applet
    "dropbear": "dropbear-bin",
    "dropbearkey": "dropbear-bin",
    "dnsmasq": "dnsmasq-base",
    "hping3": "hping3",
    "slowhttptest": "slowhttptest",
    "nmap": "nmap",
    "masscan": "masscan",
    "fping": "fping",
    "hydra": "hydra",
    "arpspoof": "dsniff",
}

# What every run needs, whatever the scenarios: the namespaces, the capture and the victim services.
BASE_TOOLS = ("ip", "ss", "sysctl", "ethtool", "unshare", "tcpdump", "openssl", "mosquitto", "mosquitto_passwd",
              "coap-server-notls", "busybox", "dropbear", "dropbearkey", "dnsmasq")


def _has_busybox_telnetd() -> bool:
    try:
        out = subprocess.run(["busybox", "--list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "telnetd" in out.split()


def missing_tools(tools: Iterable[str]) -> list[str]:
    """The programs among tools that are not on PATH (sbin included, for a non-root PATH)."""
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    missing = [t for t in dict.fromkeys(tools) if shutil.which(t) is None and shutil.which(t, path=path) is None]
    if "busybox" not in missing and "busybox" in tools and not _has_busybox_telnetd():
        missing.append("busybox")
    return missing


def packages_for(tools: Iterable[str]) -> list[str]:
    return sorted({TOOL_PACKAGES.get(t, t) for t in tools})


def all_packages() -> list[str]:
    return packages_for(TOOL_PACKAGES)


def install_command(packages: Iterable[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(sorted(packages))


def tool_versions(tools: Iterable[str]) -> dict[str, str]:
    """Installed package version of each tool's package (dpkg), for the dataset's README."""
    versions: dict[str, str] = {}
    for package in packages_for(tools):
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout:
            versions[package] = out.stdout.strip()
    return versions
