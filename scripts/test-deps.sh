#!/usr/bin/env sh
# What the test suite needs beyond Rust: libfaketime (Debian package `faketime`), which the
# clock-skew test preloads into an agent to run it hours ahead of and behind the collector.
# Debian/Ubuntu; run as root (or with sudo). Quiet when everything is there.
set -eu
for dir in /usr/lib/x86_64-linux-gnu/faketime /usr/lib/aarch64-linux-gnu/faketime /usr/lib/faketime; do
  [ -e "$dir/libfaketime.so.1" ] && exit 0
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends faketime
