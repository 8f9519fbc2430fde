#!/usr/bin/env bash
# Puts promtool, Prometheus's rule checker, into a folder (default: .venv/bin) for the
# checks in tests/integration/test_deploy_rules.py. It comes from Debian's prometheus
# package, unpacked rather than installed: installing it would also set up and start
# a Prometheus server. promtool is a static Go binary (it needs only libc).
set -euo pipefail
dest="${1:-.venv/bin}"
if [ -x "$dest/promtool" ]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download needs the package lists; a fresh machine may have none yet.
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
dpkg-deb -x prometheus_*.deb root
cd - >/dev/null
install -m 0755 "$work/root/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version 2>&1 | head -1
