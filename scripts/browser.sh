#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser test (tests/test_dashboard.py).
# Installs the `chromium` package (and a font for readable screenshots) only when
# /usr/bin/chromium is missing; needs root or sudo for that. Nothing is downloaded by the
# tests themselves, and no other browser build is fetched.
set -euo pipefail

chromium=${IMSYS_CHROMIUM:-/usr/bin/chromium}
if [[ -x $chromium ]]; then
  echo "browser: $($chromium --version 2>/dev/null | head -1)" >&2
  exit 0
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "browser: need root to run: $*" >&2; return 1; fi
}

if ! command -v apt-get >/dev/null; then
  echo "browser: $chromium is missing and there is no apt-get; install Chromium by hand" \
       "(the browser test is skipped without it)" >&2
  exit 0
fi

echo "browser: installing Debian's chromium" >&2
as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
  chromium fonts-liberation >/dev/null
echo "browser: $($chromium --version 2>/dev/null | head -1)" >&2
