#!/usr/bin/env bash
# Make sure `promtool` is at hand for the alert-rules test (tests/test_metrics_deploy.py).
# promtool comes with Debian's `prometheus` package. Installing that package would also
# enable and start a Prometheus server on hosts run by systemd, which a test set-up must
# not do; so when promtool is not already on the PATH, the package is fetched with
# `apt-get download` and only unpacked (dpkg-deb -x) into a cache directory, from which
# the test runs usr/bin/promtool. Idempotent: nothing is fetched once it is there.
# Needs root or sudo only for `apt-get update`.
set -euo pipefail

dest=${IMSYS_PROMTOOL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/imsys/prometheus}
if command -v promtool >/dev/null; then
  echo "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -1))" >&2
  exit 0
fi
if [[ -x $dest/usr/bin/promtool ]]; then
  echo "promtool: $dest/usr/bin/promtool ($("$dest/usr/bin/promtool" --version 2>&1 | head -1))" >&2
  exit 0
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "promtool: need root to run: $*" >&2; return 1; fi
}

if ! command -v apt-get >/dev/null; then
  echo "promtool: missing and there is no apt-get; install Prometheus' promtool by hand" \
       "(the alert-rules test is skipped without it)" >&2
  exit 0
fi

echo "promtool: unpacking Debian's prometheus package into $dest" >&2
as_root apt-get update -qq
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current directory; the _apt sandbox user may not be
# able to, which apt only warns about.
(cd "$work" && apt-get download -qq prometheus 2>/dev/null)
mkdir -p "$dest"
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
rm -rf "$dest/usr"
mkdir -p "$dest/usr/bin"
cp "$work/root/usr/bin/promtool" "$dest/usr/bin/promtool"
echo "promtool: $dest/usr/bin/promtool ($("$dest/usr/bin/promtool" --version 2>&1 | head -1))" >&2
