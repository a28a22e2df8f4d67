# imsys: one process running the engine, its timers and the admin server.
#
#   docker build -t imsys .
#   docker run --rm --env-file imsys.env imsys python -m imsys migrate
#   docker run -d --env-file imsys.env -p 8080:8080 --stop-timeout 40 imsys
#
# imsys.env sets at least IMSYS_REDIS__URL, IMSYS_DATABASE__URL and IMSYS_HTTP__TOKEN:
# the admin server listens on 0.0.0.0 here, and imsys refuses to do that with the
# example token. Running jobs get engine.grace_period_s (30 s) after SIGTERM, so give
# `docker stop` (or the orchestrator) a longer timeout than Docker's default 10 s.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN groupadd --system --gid 10001 imsys \
    && useradd --system --uid 10001 --gid imsys --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin imsys

WORKDIR /src
COPY pyproject.toml README.md schema.sql config.example.toml ./
COPY imsys ./imsys
# imsys/schema.sql is a symlink to the top-level schema.sql; the wheel carries its
# content, which `migrate` reads. The check after `cd /` must not see /src/imsys.
RUN pip install . \
    && cd / \
    && python -c 'from imsys.db import schema_path; p = schema_path(); assert p.is_file(), p' \
    && install -d -m 0755 /etc/imsys \
    && cp /src/config.example.toml /etc/imsys/config.example.toml \
    && cp /src/config.example.toml /etc/imsys/config.toml \
    && rm -rf /src

WORKDIR /app

# The example's values are the defaults; mount your own file over it, or override
# single keys with IMSYS_<SECTION>__<KEY> (the environment wins over the file, so set
# http.host with IMSYS_HTTP__HOST, not in the file).
ENV IMSYS_CONFIG=/etc/imsys/config.toml \
    IMSYS_HTTP__HOST=0.0.0.0

USER imsys
EXPOSE 8080

# Healthy when this process's admin server answers /healthz with 200 (Redis and
# PostgreSQL both answer it), on whatever port the settings give.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; from imsys.settings import load_settings; port = load_settings().http.port; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=5).status == 200 else 1)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "imsys", "run"]
