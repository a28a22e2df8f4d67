#!/usr/bin/env bash
# Install the Node example's packages (examples/node, ioredis pinned by package-lock.json)
# for its test (tests/test_node_example.py). Needs `node` and `npm` on the PATH; without
# them it says so and the test is skipped with that reason. Runs `npm ci` only when
# node_modules is missing or older than the lock file.
set -euo pipefail

dir=$(cd "$(dirname "$0")/../examples/node" && pwd)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "node example: node and npm are missing; install Node.js 18 or later" \
       "(the Node example's test is skipped without them)" >&2
  exit 0
fi
if [[ -d $dir/node_modules && $dir/node_modules -nt $dir/package-lock.json ]]; then
  echo "node example: packages installed (node $(node --version))" >&2
  exit 0
fi
echo "node example: npm ci in $dir" >&2
(cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
touch "$dir/node_modules"
