#!/usr/bin/env bash
# Sets up iotscan on a fresh Debian/Ubuntu machine: system packages, then a virtualenv in .venv
# with iotscan installed from this checkout (a plain, non-editable install, as pipx would do).
#
#   ./install.sh            iotscan with its report and cluster (Dask) extras, tshark (for `iotscan inspect`), the
#                           test tools (Chromium for the report's browser test) and the attack-lab tools
#   ./install.sh --minimal  iotscan and tshark only
#
# The attack-lab packages include servers (mosquitto, dropbear, dnsmasq); they are installed with
# their services kept stopped and disabled on this host: the lab starts them only inside network
# namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")"

minimal=0
[ "${1:-}" = "--minimal" ] && minimal=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

CORE_PACKAGES="python3 python3-venv python3-pip tshark"
# Tools the test suite, the benchmarks and the attack lab (`iotscan lab`) run; chromium renders the HTML report
# in its browser test and for docs/report.png.
LAB_PACKAGES="tcpdump tcpreplay iproute2 procps ethtool openssl curl \
  mosquitto mosquitto-clients libcoap3-bin busybox-static dropbear-bin dnsmasq-base \
  hping3 slowhttptest nmap masscan fping hydra dsniff chromium fonts-dejavu-core"
# busybox-static (not busybox): only the static build has the telnetd applet the lab's devices run.
SERVICES_TO_KEEP_OFF="mosquitto"

packages="$CORE_PACKAGES"
[ "$minimal" -eq 1 ] || packages="$packages $LAB_PACKAGES"

if command -v apt-get >/dev/null; then
  # Keep package scripts from starting servers on this host while installing.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy" && created_policy=1
  fi
  $SUDO apt-get update -qq
  # tshark asks whether non-root users may capture; answer "no" without a prompt.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
  [ "$created_policy" -eq 1 ] && $SUDO rm -f "$policy"
  for svc in $SERVICES_TO_KEEP_OFF; do
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
else
  echo "install.sh: no apt-get here; install $packages with your package manager, then rerun" >&2
  exit 1
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# setuptools copies into the wheel whatever an earlier install left in build/lib, modules since moved included
rm -rf build
.venv/bin/python -m pip install -q ".[test,report,cluster]"
echo "iotscan installed in .venv: run .venv/bin/iotscan --help"
