#!/bin/sh
# Unpack the Prometheus server the metrics end-to-end test scrapes with (idempotent; < 1 s when
# present). Never installed as a package and never started as a service: Debian's .deb is
# downloaded with `apt-get download` (the binary is statically linked, so nothing else is
# needed) and unpacked with dpkg-deb -x into $MTLS_PROMETHEUS_ROOT (default
# /opt/mtls-test/prometheus). The test runs it on loopback with its own configuration and
# storage directory. Safe on a live host: no unit file is installed, no user is created.
#
#   install_prometheus.sh   unpack when missing (root or sudo)
set -eu

PROM_ROOT=${MTLS_PROMETHEUS_ROOT:-/opt/mtls-test/prometheus}   # same variable as the e2e test
BINARY="$PROM_ROOT/usr/bin/prometheus"

if [ -f "$PROM_ROOT/.unpacked" ] && [ -x "$BINARY" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

echo "install_prometheus: unpacking prometheus into $PROM_ROOT (no package is installed)"
tmp=$(mktemp -d)
trap '$SUDO rm -rf "$tmp"' EXIT
# let apt's sandbox user write the download (else apt warns and downloads as root)
$SUDO chown _apt "$tmp" 2>/dev/null || true
if ! (cd "$tmp" && $SUDO apt-get download -qq prometheus >/dev/null 2>&1); then
    $SUDO apt-get update -qq
    (cd "$tmp" && $SUDO apt-get download -qq prometheus >/dev/null)
fi
$SUDO rm -rf "$PROM_ROOT"
$SUDO mkdir -p "$PROM_ROOT"
for deb in "$tmp"/*.deb; do
    $SUDO dpkg-deb -x "$deb" "$PROM_ROOT"
done
"$BINARY" --version >/dev/null
$SUDO touch "$PROM_ROOT/.unpacked"
echo "install_prometheus: done"
