#!/usr/bin/env bash
# Install the Debian packages the tests need (servers started by tests/servers.py). Idempotent: when all are
# installed it only runs `dpkg -s` and exits. It never starts or enables a system-wide service.
# Usage: scripts/setup_system.sh            (root, or a user with sudo)
set -euo pipefail

# Extend here (one name per line); later: orthanc orthanc-dicomweb dicom3tools chromium chromium-driver
PACKAGES=(
  postgresql
  dicom3tools
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
