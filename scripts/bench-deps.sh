#!/usr/bin/env sh
# Tools the benchmarks compare against (not needed by the tests): nginx for
# keytrail-proxy-bench. Debian/Ubuntu; run as root (or with sudo).
set -eu
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  echo "nginx already installed: $(/usr/sbin/nginx -v 2>&1)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends nginx-light || $SUDO apt-get install -y -q --no-install-recommends nginx
# Debian starts the packaged service on port 80; the benchmark runs its own instance.
$SUDO nginx -s stop 2>/dev/null || true
