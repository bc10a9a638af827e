#!/usr/bin/env bash
# Install the Debian packages the tests need (servers started by tests/servers.py). Idempotent: when all are
# installed it only runs `dpkg -s` and exits. It leaves no system-wide service running (a postinst may still
# enable its unit: inert where systemd is not running, as in the containers).
# Usage: scripts/setup_system.sh            (root, or a user with sudo)
set -euo pipefail

# Extend here (one name per line)
PACKAGES=(
  postgresql
  dicom3tools
  orthanc
  orthanc-dicomweb
  orthanc-python
  dcmtk
  chromium
  chromium-driver
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$'; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "       not root and no sudo; ask an administrator to run: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "installing Debian packages: ${missing[*]} ..."
# policy-rc.d exit code 101 tells invoke-rc.d not to start services during the install (restored afterwards);
# the tests start their own throwaway servers.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod 755 "$policy"
  own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"

# A postinst may still start a server (e.g. under an existing, permissive policy-rc.d): stop the system-wide
# services of the packages installed just now; the tests start their own.
for pair in orthanc:Orthanc postgresql:postgres; do
  pkg=${pair%%:*} proc=${pair#*:}
  [[ " ${missing[*]} " == *" $pkg "* ]] || continue
  if pgrep -x "$proc" >/dev/null 2>&1; then
    echo "stopping the system-wide $pkg service started by the package ..."
    if [ -d /run/systemd/system ]; then
      "${SUDO[@]}" systemctl stop "$pkg" || true
    elif [ -x "/etc/init.d/$pkg" ]; then
      "${SUDO[@]}" "/etc/init.d/$pkg" stop || true
    fi
  fi
done
