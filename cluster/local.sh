#!/usr/bin/env bash
# A two-node Ray cluster and an MLflow tracking server on this machine: the cluster path, tried and tested
# without a cloud.
#
#   eval "$(cluster/local.sh up)"   start whatever is not running; print the variables to export
#   eval "$(cluster/local.sh mlflow)"   the MLflow server alone, and its variables
#   cluster/local.sh status         which of our processes run, and the cluster's nodes
#   cluster/local.sh env            print the variables to export again
#   cluster/local.sh down           stop exactly the processes `up` started (never `ray stop`)
#
# Nodes: the head advertises {"cpu_node": 1}, the second node {"train_node": 1}; each has HVD_NODE_CPUS
# CPUs (default 2), HVD_OBJECT_STORE_MB of object store (default 256), its own ports and temp dir.
# Every process listens on 127.0.0.1 only (Ray in its one-machine mode, see CLUSTER_ENV); Ray token
# authentication stays on all the same, with a token private to this cluster.
# MLflow runs its basic-auth app: every request but /health needs a user's password. Its one user here is
# `admin`, with a random password made on the first `up`; `up` and `env` print it as
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and both nodes carry them, so every job logs in.
# HVD_CLUSTER_DIR (default /tmp/hvd-cluster-$UID; keep it short, Ray's socket paths live under it) holds
# pids, ports, logs and the token. HVD_MLFLOW_DIR (default runs/mlflow-server, made private to you) keeps
# MLflow's SQLite store, artifacts, users (basic_auth.db) and the admin password across down and up: the
# password lives as long as the user database that holds its hash. HVD_ROOT (default this checkout), fixed
# when the head starts, is every node's project root: relative data, shard and checkpoint paths of every
# job resolve against it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HVD_CLUSTER_DIR:-/tmp/hvd-cluster-$(id -u)}"
MLFLOW_DIR="${HVD_MLFLOW_DIR:-$ROOT/runs/mlflow-server}"
NODE_CPUS="${HVD_NODE_CPUS:-2}"
OBJECT_STORE_BYTES=$((${HVD_OBJECT_STORE_MB:-256} * 1024 * 1024))
BIN="${HVD_VENV:-$ROOT/.venv}/bin"
START_TIMEOUT_S="${HVD_START_TIMEOUT_S:-300}"
MLFLOW_USER=admin

log() { echo "[local.sh] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[[ -x "$BIN/ray" && -x "$BIN/mlflow" ]] || die "no ray or mlflow in $BIN: run 'make demo' first, or set HVD_VENV"

# The environment of every Ray process and client of this cluster: our venv first, our token.
# Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's one-machine mode, in which 127.0.0.1 stays
# 127.0.0.1 (otherwise Ray swaps it for the machine's routable address), so every node's gRPC servers,
# agents, client server and the autoscaler's and dashboard's metrics servers bind loopback. No Prometheus
# exports: nothing here scrapes them (RAY_enable_metrics_collection=0 keeps each node's agent from opening
# its metrics port). No drain on SIGTERM: it lets Ray Serve replicas quiesce (none here) and made `down`
# wait its full 30 s per node whenever a finished job's workers were still idle.
CLUSTER_ENV=(env -u RAY_ADDRESS -u RAY_AUTH_TOKEN "PATH=$BIN:$PATH" RAY_AUTH_MODE=token
    "RAY_AUTH_TOKEN_PATH=$STATE/auth_token" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_enable_metrics_collection=0
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0)
# One-machine mode refuses to start a second node, so that node's `ray start` runs with the refusal lifted
# and 127.0.0.1 taken as given; what the node starts inherits one-machine mode from CLUSTER_ENV.
RAY_START_SECOND_NODE=("$BIN/python" -c 'import sys, ray._private.ray_constants as constants, ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())')

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

free_ports() { # free_ports N [--block K]: N free TCP ports, then the first and last of K consecutive free ones
    "$BIN/python" - "$@" <<'EOF'
import random, socket, sys

def free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True

count, block = int(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
held = [socket.socket() for _ in range(count)]  # held together, so the ports differ
for sock in held:
    sock.bind(("", 0))
ports = [sock.getsockname()[1] for sock in held]
for sock in held:
    sock.close()
while block:
    start = random.randrange(20000, 60000 - block)
    if all(free(p) and p not in ports for p in range(start, start + block)):
        ports += [start, start + block - 1]
        break
print(*ports)
EOF
}

wait_for() { # wait_for WHAT NAME COMMAND...: poll COMMAND until it succeeds, while process NAME lives
    local what="$1" name="$2" deadline=$((SECONDS + START_TIMEOUT_S))
    shift 2
    until "$@" >/dev/null 2>&1; do
        alive "$name" || die "$what exited; see $STATE/$name.log"
        ((SECONDS < deadline)) || die "$what not ready after ${START_TIMEOUT_S}s; see $STATE/$name.log"
        sleep 2
    done
}

# Each daemon runs in a session of its own (setsid), so that `down` stops its whole process group.
spawn() { # spawn NAME COMMAND...
    local name="$1"
    shift
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

new_secret() { # new_secret FILE: a random hex secret in FILE, readable by us only, unless FILE holds one
    [[ -s "$1" ]] || (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32), end="")' \
        >"$1")
}

# Basic auth: users and permissions in basic_auth.db beside the store; the admin account is created from
# MLFLOW_AUTH_ADMIN_* on the first start (later starts keep the stored one). A user without a grant sees
# nothing (NO_PERMISSIONS); a request without credentials gets 401, except /health. The Flask secret key
# signs the sign-up form's CSRF token: one per start serves the single server process.
# No job runner: MLflow 3.17 otherwise starts one and seven huey consumer processes (2.3 GiB resident
# against 0.5 GiB, docs/tracking.md) for GenAI jobs (judges, prompt optimisation) that hvd never submits;
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the caller's environment brings it back.
start_mlflow() {
    local port
    if [[ -f "$STATE/mlflow.port" ]]; then port=$(cat "$STATE/mlflow.port"); else port=$(free_ports 1); fi
    mkdir -p "$MLFLOW_DIR/artifacts"
    # auth_cache_ttl_seconds: a verified password is remembered for a minute (keyed by an HMAC under a per-process
    # key); otherwise every request, each metric a worker logs among them, pays one scrypt check (0.1-0.2 s of CPU).
    printf '%s\n' "[mlflow]" "default_permission = NO_PERMISSIONS" "auth_cache_ttl_seconds = 60" \
        "database_uri = sqlite:///${MLFLOW_DIR//%/%%}/basic_auth.db" >"$STATE/basic_auth.ini"
    MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini" MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" \
        MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
        MLFLOW_FLASK_SERVER_SECRET_KEY="$("$BIN/python" -c 'import secrets; print(secrets.token_hex(32))')" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        spawn mlflow "$BIN/mlflow" server --app-name basic-auth --host 127.0.0.1 --port "$port" --workers 1 \
        --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" --artifacts-destination "$MLFLOW_DIR/artifacts"
    echo "$port" >"$STATE/mlflow.port"
    wait_for "MLflow server" mlflow curl -sf "http://127.0.0.1:$port/health"
    log "MLflow server on http://127.0.0.1:$port (store $MLFLOW_DIR)"
}

# Every port a node opens is chosen here (node manager, object manager, dashboard agent HTTP and gRPC,
# runtime env agent, metrics, a block of worker ports), so two nodes, and other Ray clusters on this
# machine, never collide on Ray's fixed defaults. The node name carries its node manager port: unique
# per start, so a restarted node is told apart from its dead predecessor.
node_args() { # node_args NAME
    local p
    read -r -a p <<<"$(free_ports 5 --block 100)"
    echo "--node-name=$1-${p[0]} --node-manager-port=${p[0]} --object-manager-port=${p[1]}" \
        "--dashboard-agent-listen-port=${p[2]} --dashboard-agent-grpc-port=${p[3]}" \
        "--runtime-env-agent-port=${p[4]}" \
        "--min-worker-port=${p[5]} --max-worker-port=${p[6]}" \
        "--num-cpus=$NODE_CPUS --object-store-memory=$OBJECT_STORE_BYTES --disable-usage-stats"
}

# RAY_ADDRESS in each node's environment points Ray's own helpers that look the cluster up (Ray Train's
# placement group cleaner, the state API) at this cluster rather than at another one on the machine.
# MLFLOW_TRACKING_URI, HVD_ROOT and the MLflow credentials `up` exports reach every job's driver: jobs run
# in a copy of the working directory, so relative paths resolve against HVD_ROOT, one folder for both nodes.
start_node() { # start_node NAME [ENV=VALUE...] RAY_COMMAND... -- RAY_START_FLAGS...: start it, wait until the cluster lists it ALIVE
    local name="$1" args node_env=() command=()
    shift
    while [[ "$1" == *=* ]]; do
        node_env+=("$1")
        shift
    done
    while [[ "$1" != "--" ]]; do
        command+=("$1")
        shift
    done
    shift
    args=$(node_args "$name")
    # shellcheck disable=SC2086  # $args is a list of flags
    spawn "$name" "${CLUSTER_ENV[@]}" "${node_env[@]}" "RAY_ADDRESS=127.0.0.1:$GCS_PORT" \
        "MLFLOW_TRACKING_URI=http://127.0.0.1:$(cat "$STATE/mlflow.port")" \
        "HVD_ROOT=$(cat "$STATE/hvd_root")" \
        "${command[@]}" start --block --node-ip-address=127.0.0.1 --temp-dir="$STATE/$name" "$@" $args
    wait_for "Ray $name node" "$name" node_alive "${args%% *}"
}

node_alive() { # node_alive --node-name=NAME: the head's state API lists that node ALIVE
    "${CLUSTER_ENV[@]}" "$BIN/python" - "$DASHBOARD_PORT" "${1#--node-name=}" <<'EOF'
import sys
from ray.util.state import list_nodes
port, name = sys.argv[1:]
nodes = list_nodes(address=f"http://127.0.0.1:{port}", filters=[("node_name", "=", name), ("state", "=", "ALIVE")],
                   raise_on_missing_output=False)
sys.exit(0 if nodes else 1)
EOF
}

# The autoscaler's and the dashboard's metrics servers take fixed ports unless told: free ones, so that
# other Ray clusters on this machine do not collide with them.
start_head() {
    local client_port autoscaler_metrics dashboard_metrics
    read -r GCS_PORT DASHBOARD_PORT client_port autoscaler_metrics dashboard_metrics <<<"$(free_ports 5)"
    printf '%s\n' "GCS_PORT=$GCS_PORT" "DASHBOARD_PORT=$DASHBOARD_PORT" >"$STATE/head.ports"
    mkdir -p "${HVD_ROOT:-$ROOT}"
    (cd "${HVD_ROOT:-$ROOT}" && pwd) >"$STATE/hvd_root" # absolute, and the same for a worker that restarts
    start_node head "AUTOSCALER_METRIC_PORT=$autoscaler_metrics" "DASHBOARD_METRIC_PORT=$dashboard_metrics" \
        "$BIN/ray" -- --head --port="$GCS_PORT" --include-dashboard=true --dashboard-host=127.0.0.1 \
        --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$client_port" --resources='{"cpu_node": 1}'
    log "Ray head at 127.0.0.1:$GCS_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
}

start_worker() {
    start_node worker "${RAY_START_SECOND_NODE[@]}" -- --address="127.0.0.1:$GCS_PORT" --resources='{"train_node": 1}'
    log "Ray worker node joined"
}

exports() {
    # shellcheck disable=SC1091
    . "$STATE/head.ports"
    echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" # clients too: 127.0.0.1 is where this cluster listens
    echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    mlflow_exports
    printf 'export HVD_ROOT=%q\n' "$(cat "$STATE/hvd_root")"
}

mlflow_exports() {
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(cat "$STATE/mlflow.port")"
    echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_USER"
    echo "export MLFLOW_TRACKING_PASSWORD=$(cat "$MLFLOW_DIR/admin_password")"
}

stop() { # stop NAME: its process group, politely, then firmly after 30 s
    local name="$1" pid waited=0
    [[ -f "$STATE/$name.pid" ]] || return 0
    pid=$(cat "$STATE/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true # `ray start --block` stops the node's processes itself
        while kill -0 "$pid" 2>/dev/null && ((waited < 30)); do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        log "stopped $name (process group $pid)"
    fi
    rm -f "$STATE/$name.pid"
}

mlflow_up() {
    mkdir -p -m 700 "$STATE" "$MLFLOW_DIR"
    chmod 700 "$MLFLOW_DIR" # its files are the store itself: whoever reads them needs no password
    new_secret "$MLFLOW_DIR/admin_password"
    # the server's admin account, and what the nodes `up` starts next (environment inherited) log in with
    MLFLOW_TRACKING_USERNAME=$MLFLOW_USER MLFLOW_TRACKING_PASSWORD=$(cat "$MLFLOW_DIR/admin_password")
    export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    alive mlflow || start_mlflow
}

up() {
    mlflow_up
    new_secret "$STATE/auth_token"
    if alive head; then
        # shellcheck disable=SC1091
        . "$STATE/head.ports"
    else
        stop worker # a worker node does not outlive its head
        start_head
    fi
    alive worker || start_worker
    exports | tee "$STATE/env.sh"
}

down() {
    [[ -d "$STATE" ]] || {
        log "nothing started under $STATE"
        return 0
    }
    stop worker
    stop head
    stop mlflow
    # Ray daemons that left their session (the reaper, orphaned workers) still name our private dir.
    local pid
    for pid in $(pgrep -f -- "$STATE/" || true); do
        if kill -KILL "$pid" 2>/dev/null; then log "stopped leftover Ray process $pid"; fi
    done
    rm -rf "${STATE:?}/head" "${STATE:?}/worker"
}

status() {
    local name
    for name in mlflow head worker; do
        if alive "$name"; then log "$name: running (pid $(cat "$STATE/$name.pid"))"; else log "$name: stopped"; fi
    done
    if alive head; then
        # shellcheck disable=SC1091
        . "$STATE/head.ports"
        "${CLUSTER_ENV[@]}" "$BIN/ray" status --address="127.0.0.1:$GCS_PORT" >&2
    fi
}

case "${1:-}" in
up) up ;;
mlflow) mlflow_up && mlflow_exports ;;
down) down ;;
status) status ;;
env) exports ;;
*)
    echo "usage: $0 up|mlflow|down|status|env" >&2
    exit 2
    ;;
esac
