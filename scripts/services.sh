#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer at the configured URLs; when they do not, start
# local ones from the system's binaries, installing Debian's packages if they are missing.
# Reads IMSYS_REDIS__URL / IMSYS_DATABASE__URL (defaults: the service's own defaults).
set -euo pipefail

redis_url=${IMSYS_REDIS__URL:-redis://127.0.0.1:6379/0}
db_url=${IMSYS_DATABASE__URL:-postgresql://postgres@127.0.0.1:5432/imsys}
state=${IMSYS_SERVICES_DIR:-/tmp/imsys-services}

hostport() {  # URL default_port -> "host port"
  python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PY
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "services: need root to run: $*" >&2; return 1; fi
}

apt_install() {
  echo "services: installing $*" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

is_local() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

wait_for() {  # seconds command...
  local n=$1; shift
  for _ in $(seq 1 $((n * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# --- Redis ---------------------------------------------------------------------------
read -r rhost rport < <(hostport "$redis_url" 6379)
redis_ping() { python3 - "$rhost" "$rport" <<'PY'
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
s.sendall(b"PING\r\n"); ok = s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
sys.exit(0 if ok else 1)
PY
}
if redis_ping 2>/dev/null; then
  echo "services: redis answers at $rhost:$rport" >&2
elif is_local "$rhost"; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$state/redis"
  redis-server --daemonize yes --bind "$rhost" --port "$rport" --save "" --appendonly no \
    --dir "$state/redis" --logfile "$state/redis/redis.log" >/dev/null
  wait_for 10 redis_ping || { echo "services: redis did not start (see $state/redis/redis.log)" >&2; exit 1; }
  echo "services: started redis at $rhost:$rport" >&2
else
  echo "services: redis at $rhost:$rport does not answer and is not local" >&2; exit 1
fi

# --- PostgreSQL --------------------------------------------------------------------------
read -r phost pport < <(hostport "$db_url" 5432)
pg_up() { python3 - "$phost" "$pport" <<'PY'
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
PY
}
if pg_up 2>/dev/null && { ! command -v pg_isready >/dev/null || pg_isready -q -h "$phost" -p "$pport"; }; then
  echo "services: postgres answers at $phost:$pport" >&2
elif is_local "$phost"; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then apt_install postgresql; fi
  started=""
  # A packaged cluster on this port (the usual case: installed but stopped).
  if command -v pg_lsclusters >/dev/null; then
    while read -r ver name port _; do
      if [[ $port == "$pport" ]]; then
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>/dev/null || true
        started="$ver/$name"
      fi
    done < <(pg_lsclusters -h 2>/dev/null)
  fi
  if ! wait_for 15 pg_up; then
    # No usable cluster: a private one with trust auth on loopback, owned by postgres.
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    dir="$state/pg"
    as_root mkdir -p "$dir" && as_root chown postgres "$dir" 2>/dev/null || true
    if [[ ! -f $dir/PG_VERSION ]]; then
      as_root runuser -u postgres -- "$bin/initdb" -D "$dir" -A trust -U postgres >/dev/null
    fi
    as_root runuser -u postgres -- "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-p $pport -c listen_addresses=$phost -k /tmp" start >/dev/null
    started="private cluster in $dir"
  fi
  wait_for 15 pg_up || { echo "services: postgres did not start" >&2; exit 1; }
  echo "services: started postgres at $phost:$pport ($started)" >&2
else
  echo "services: postgres at $phost:$pport does not answer and is not local" >&2; exit 1
fi
