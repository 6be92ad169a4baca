#!/usr/bin/env bash
# System packages the test suite needs, installed only where missing (Debian/Ubuntu, as root).
# Each feature adds its package here; tests that need one skip with a reason if it is absent.
set -euo pipefail
need=()
for pair in chromium:chromium /usr/sbin/sshd:openssh-server systemd-analyze:systemd storescu:dcmtk /usr/sbin/Orthanc:orthanc; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${need[*]}; install them (Debian: apt-get install ${need[*]}) or the tests that need them skip" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The tests start their own Orthanc on loopback; the packaged service must not listen on the LAN.
if [[ " ${need[*]} " == *" orthanc "* ]] && command -v systemctl >/dev/null; then
  systemctl disable --now orthanc >/dev/null 2>&1 || true
fi
