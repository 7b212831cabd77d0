#!/usr/bin/env bash
# compare.sh - measure regcache side by side with nginx, CNCF Distribution's proxy mode and
# the upstream registry itself, in one run on loopback, and print the targets of the
# performance issue with the measured ratio and PASS/FAIL.
#
# Usage (from the repository root, after `cargo build --release`):
#   loadtest/compare.sh            the full comparison (minutes)
#   loadtest/compare.sh --smoke    a short run (small blobs, one round of everything) that
#                                  checks the script and the correctness rows (every body
#                                  verified, one upstream fetch per blob); CI runs it. Exit 1
#                                  when a correctness row fails. Settings below still apply.
#
# What it starts, all on 127.0.0.1 (free ports from $BASE_PORT on), all stopped on exit:
#   upstream      Debian's docker-registry (CNCF Distribution 2.8), holding the test images
#   regcache      target/release/regcache serve --config <generated>, upstream = the above
#   distribution  docker-registry in proxy mode (proxy.remoteurl = the upstream): the peer
#   nginx         serving the same 256 MiB layer file with sendfile: the serving ceiling
#
# Settings (environment):
#   LAYER_MIB=256        size of the large layer
#   WARM_SECS=5          duration of each warm-blob run; WARM_ROUNDS=4 rounds per target,
#                        interleaved (nginx, distribution, regcache, nginx, ...); best round
#                        of each target compared
#   WARM_CONN=8          connections of the warm-blob runs
#   WRK_SECS=5           wrk cross-check of the warm numbers (0 skips)
#   NGINX_LISTEN_OPTS=   extra options of nginx's listen directive (e.g. "reuseport")
#   COLD_RUNS=2          cold pulls through regcache and straight from the upstream
#   CONC_LIST="8 16 64"  concurrent cold clients of a fresh blob (coalescing)
#   LAYERS=30            many-layer image: LAYERS layers of LAYERS_MIN_MIB=1 to
#                        LAYERS_MAX_MIB=20 MiB, pulled LAYER_CONN=3 layers at a time
#                        (0 skips)
#   WAN_MIB=64           WAN-like upstream: an image with a WAN_MIB layer pulled through a
#                        throttling proxy adding WAN_RTT_MS=20 ms of round trip and a
#                        WAN_MBIT=200 Mbit/s cap (0 skips)
#   H2_RTT_MS=100        the same layer's blob from the upstream over TLS and HTTP/2 (as
#                        public registries speak) through a second throttle, H2_RTT_MS of
#                        round trip and H2_MBIT=800 Mbit/s: curl straight from it vs through
#                        regcache, cold (H2_RTT_MS=0 or WAN_MIB=0 skips; needs openssl)
#   PREFAULT=1           before the cold pulls, touch all free memory but 2 GiB once (see
#                        "page_cache_gbs" below and loadtest/README.md); 0 skips (smoke: 0)
#   STORM_SECS=10        manifest storm duration per target; STORM_CONN=16 connections
#   STARTUP_BLOBS=100000 blobs seeded into the store for the start-up time (0 skips)
#   BASE_PORT=15500      first port tried
#   WORK=DIR             work directory (default: a new one under $TMPDIR or /tmp)
#   KEEP_WORK=1          keep storage and blob files (default: only logs and results are kept)
#   REGCACHE_BIN=PATH    default: <repo>/target/release/regcache (built when missing)
#   LOADTEST_BIN=PATH    default: <repo>/loadtest/target/release/loadtest (built when unset)
#   NO_INSTALL=1         never run apt-get (fail if a tool is missing)
#
# Output: a one-line summary of every measurement on stderr as it happens; the targets table
# on stdout; every run's JSON in $WORK/results/*.json and the targets in
# $WORK/results/targets.tsv. Exit status 0 when the run completed (whatever PASS/FAIL says),
# 1 when a measurement itself failed (a client saw wrong bytes, a server did not start, ...).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'compare.sh: error: %s\n' "$*" >&2; exit 1; }

SMOKE=0
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  --smoke) SMOKE=1 ;;
  "") ;;
  *) die "unknown argument $1 (see --help)" ;;
esac
if [ "$SMOKE" = 1 ]; then
  # Small and short: about a minute on 2 cores, most of it start-up and pushes.
  : "${LAYER_MIB:=16}" "${WARM_SECS:=1}" "${WARM_ROUNDS:=1}" "${WRK_SECS:=1}" "${COLD_RUNS:=1}"
  : "${CONC_LIST:=4}" "${STORM_SECS:=1}" "${STORM_CONN:=4}" "${STARTUP_BLOBS:=1000}"
  : "${LAYERS:=6}" "${LAYERS_MAX_MIB:=2}" "${WAN_MIB:=2}" "${PREFAULT:=0}"
fi

LAYER_MIB="${LAYER_MIB:-256}"
WARM_SECS="${WARM_SECS:-5}"
WARM_ROUNDS="${WARM_ROUNDS:-4}"
NGINX_LISTEN_OPTS="${NGINX_LISTEN_OPTS:-}"
WARM_CONN="${WARM_CONN:-8}"
WRK_SECS="${WRK_SECS:-5}"
COLD_RUNS="${COLD_RUNS:-2}"
CONC_LIST="${CONC_LIST:-8 16 64}"
STORM_SECS="${STORM_SECS:-10}"
STORM_CONN="${STORM_CONN:-16}"
STARTUP_BLOBS="${STARTUP_BLOBS:-100000}"
LAYERS="${LAYERS:-30}"
LAYERS_MIN_MIB="${LAYERS_MIN_MIB:-1}"
LAYERS_MAX_MIB="${LAYERS_MAX_MIB:-20}"
LAYER_CONN="${LAYER_CONN:-3}"
WAN_MIB="${WAN_MIB:-64}"
WAN_RTT_MS="${WAN_RTT_MS:-20}"
WAN_MBIT="${WAN_MBIT:-200}"
H2_RTT_MS="${H2_RTT_MS:-100}"
H2_MBIT="${H2_MBIT:-800}"
PREFAULT="${PREFAULT:-1}"
BASE_PORT="${BASE_PORT:-15500}"
KEEP_WORK="${KEEP_WORK:-0}"
REGCACHE_BIN="${REGCACHE_BIN:-$ROOT/target/release/regcache}"
LOADTEST_BIN="${LOADTEST_BIN:-}"
UPSTREAM_NAME="upstream.local"

int_in() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
int_in "$LAYER_MIB" 1 4096 || die "LAYER_MIB must be 1..4096"
int_in "$WARM_SECS" 1 120 || die "WARM_SECS must be 1..120"
int_in "$WARM_ROUNDS" 1 10 || die "WARM_ROUNDS must be 1..10"
[[ "$NGINX_LISTEN_OPTS" =~ ^[a-z_=0-9\ ]*$ ]] || die "NGINX_LISTEN_OPTS: letters, digits, '_', '=' and spaces only"
int_in "$WARM_CONN" 1 256 || die "WARM_CONN must be 1..256"
int_in "$WRK_SECS" 0 60 || die "WRK_SECS must be 0..60"
int_in "$COLD_RUNS" 1 5 || die "COLD_RUNS must be 1..5"
int_in "$STORM_SECS" 1 120 || die "STORM_SECS must be 1..120"
int_in "$STORM_CONN" 1 256 || die "STORM_CONN must be 1..256"
int_in "$STARTUP_BLOBS" 0 1000000 || die "STARTUP_BLOBS must be 0..1000000"
for n in $CONC_LIST; do int_in "$n" 1 256 || die "CONC_LIST entries must be 1..256"; done
int_in "$LAYERS" 0 200 || die "LAYERS must be 0..200"
int_in "$LAYERS_MIN_MIB" 1 1024 || die "LAYERS_MIN_MIB must be 1..1024"
int_in "$LAYERS_MAX_MIB" "$LAYERS_MIN_MIB" 1024 || die "LAYERS_MAX_MIB must be LAYERS_MIN_MIB..1024"
int_in "$LAYER_CONN" 1 16 || die "LAYER_CONN must be 1..16"
int_in "$WAN_MIB" 0 4096 || die "WAN_MIB must be 0..4096"
int_in "$WAN_RTT_MS" 0 1000 || die "WAN_RTT_MS must be 0..1000"
int_in "$WAN_MBIT" 1 100000 || die "WAN_MBIT must be 1..100000"
int_in "$H2_RTT_MS" 0 1000 || die "H2_RTT_MS must be 0..1000"
int_in "$H2_MBIT" 1 100000 || die "H2_MBIT must be 1..100000"
int_in "$PREFAULT" 0 1 || die "PREFAULT must be 0 or 1"

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
# CPU seconds of the whole machine (all cores; user, nice, system, irq and softirq time) from
# /proc/stat. Softirq time is included: the loopback traffic of the run is processed there, and
# the kernel also charges it to the task that was running, so it shows up in "ours" as well.
machine_busy_s() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { print ($2 + $3 + $4 + $7 + $8) / hz; exit }' /proc/stat; }
pid_cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); split($0, f, " "); print (f[12] + f[13]) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# ours_cpu: sets OURS_CPU to the CPU seconds of everything this script ran: its finished
# children (bash's `times`, which must run in this shell, not in a $(...) subshell) plus the
# daemons still running (nginx's workers are not its children: they are added one by one).
OURS_CPU=0
ours_cpu() {
  local entry pid p total
  times >"$TIMES_FILE"
  total="$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } print s + 0 }' "$TIMES_FILE")"
  for entry in "${PIDS[@]}"; do
    pid="${entry#*:}"
    if alive "$pid"; then total="$(awk -v a="$total" -v b="$(pid_cpu_s "$pid")" 'BEGIN { print a + b }')"; fi
  done
  for p in ${NGINX_WORKERS:-}; do
    total="$(awk -v a="$total" -v b="$(pid_cpu_s "$p")" 'BEGIN { print a + b }')"
  done
  OURS_CPU="$total"
}

# --- tools ------------------------------------------------------------------------------
install_tools() {
  local missing=() c pkg
  for c in docker-registry:docker-registry nginx:nginx curl:curl jq:jq wrk:wrk skopeo:skopeo openssl:openssl pgrep:procps; do
    command -v "${c%%:*}" >/dev/null 2>&1 || missing+=("${c#*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "${NO_INSTALL:-0}" = 1 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    # wrk, skopeo and openssl are optional (cross-checks, the HTTP/2 row); the others are not.
    for pkg in "${missing[@]}"; do
      case "$pkg" in wrk|skopeo|openssl) log "optional tool $pkg missing: its measurement is skipped" ;;
        *) die "missing $pkg (apt-get install -y docker-registry nginx wrk skopeo jq curl procps)" ;; esac
    done
    return 0
  fi
  log "installing ${missing[*]} with apt-get"
  # Debian starts a package's system service on install (nginx on :80, docker-registry on
  # :5000); a temporary policy-rc.d forbids that, so that nothing listens beyond loopback.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed"
}
install_tools
command -v wrk >/dev/null 2>&1 || WRK_SECS=0
command -v openssl >/dev/null 2>&1 || H2_RTT_MS=0
[ "$WAN_MIB" != 0 ] || H2_RTT_MS=0
HAVE_SKOPEO=0
command -v skopeo >/dev/null 2>&1 && HAVE_SKOPEO=1

if [ ! -x "$REGCACHE_BIN" ]; then
  log "building regcache (cargo build --release in $ROOT)"
  (cd "$ROOT" && cargo build --release) >&2 || die "cargo build --release failed"
fi
if [ -z "$LOADTEST_BIN" ]; then
  log "building the load generator (cargo build --release in $HERE)"
  (cd "$HERE" && cargo build --release --quiet) >&2 || die "building loadtest failed"
  LOADTEST_BIN="$HERE/target/release/loadtest"
fi
[ -x "$LOADTEST_BIN" ] || die "LOADTEST_BIN=$LOADTEST_BIN is not an executable"

# --- work directory and daemons ------------------------------------------------------------
if [ -n "${WORK:-}" ]; then
  mkdir -p "$WORK"
  W="$(cd "$WORK" && pwd)"
else
  W="$(mktemp -d "${TMPDIR:-/tmp}/regcache-compare.XXXXXX")"
fi
R="$W/results"
mkdir -p "$R" "$W/up" "$W/regcache" "$W/dist" "$W/nginx/tmp" "$W/www"
PIDS=() # "name:pid" of every daemon started here
TIMES_FILE="$R/.times"
ours_cpu
OURS_START="$OURS_CPU"
BUSY_START="$(machine_busy_s)"
T_START="$(date +%s%N)"

# alive PID: the process exists and is not a zombie. An unreadable /proc/PID/stat means it is
# gone (bash may reap an exited child at any moment, even between two checks).
alive() {
  local state
  state="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_pid() { # NAME PID: TERM, up to 10 s, then KILL; by PID only
  local name="$1" pid="$2" i=0
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while [ "$i" -lt 100 ] && alive "$pid"; do sleep 0.1; i=$((i + 1)); done
  if [ "$i" -ge 100 ] && alive "$pid"; then
    log "$name (PID $pid) ignored TERM for 10 s: KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? entry
  trap - EXIT INT TERM
  local i
  # newest first: clients of the upstream (nginx, the proxies) stop before it
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    entry="${PIDS[$i]}"
    stop_pid "${entry%%:*}" "${entry#*:}"
  done
  if [ "$KEEP_WORK" != 1 ]; then
    rm -rf "$W/up/storage" "$W/regcache/data" "$W/dist/storage" "$W/distwan/storage" "$W/www" "$W/nginx/tmp"
    # the manifest storm leaves ~10^5 log lines per server: keep them compressed
    find "$W" -name '*.log' -size +10M -exec gzip -1 {} + 2>/dev/null || true
  fi
  log "work directory (logs, results): $W"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "stopped: line $LINENO: $BASH_COMMAND failed"' ERR

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
NEXT_PORT="$BASE_PORT"
free_port() { # VAR: sets VAR to a free port >= NEXT_PORT (at most 500 tries)
  local i=0 p
  while [ "$i" -lt 500 ]; do
    p=$((NEXT_PORT + i))
    if port_free "$p"; then
      NEXT_PORT=$((p + 1))
      printf -v "$1" '%s' "$p"
      return 0
    fi
    i=$((i + 1))
  done
  die "no free port in $NEXT_PORT..$((NEXT_PORT + 499))"
}

wait_http() { # URL [TRIES of 0.1 s, default 150] [CURL ARGS...]: until it answers any HTTP status
  local url="$1" tries="${2:-150}" i=0 code
  shift $(($# < 2 ? $# : 2))
  while [ "$i" -lt "$tries" ]; do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true)"
    [ -n "$code" ] && [ "$code" != 000 ] && return 0
    sleep 0.1
    i=$((i + 1))
  done
  return 1
}

start_daemon() { # NAME LOGFILE CMD...: sets DAEMON_PID
  local name="$1" logfile="$2"
  shift 2
  "$@" >>"$logfile" 2>&1 </dev/null &
  DAEMON_PID=$!
  PIDS+=("$name:$DAEMON_PID")
}

# wait_ready NAME PID URL LOG: the daemon answers URL and is still alive (a daemon that lost
# a port race exits, while another process may answer on that port)
wait_ready() { # NAME PID URL LOG [CURL ARGS...]
  if ! wait_http "$3" 150 "${@:5}" || ! alive "$2"; then
    tail -20 "$4" >&2 || true
    die "$1 did not start (see $4)"
  fi
}

free_port UP_PORT
free_port RC_PORT
free_port DIST_PORT
free_port NGINX_PORT
free_port WAN_PORT
free_port DISTWAN_PORT
free_port UPTLS_PORT
free_port H2WAN_PORT
UP="http://127.0.0.1:$UP_PORT"
RC="http://127.0.0.1:$RC_PORT"
DIST="http://127.0.0.1:$DIST_PORT"
NGINX="http://127.0.0.1:$NGINX_PORT"
WAN="http://127.0.0.1:$WAN_PORT"
DISTWAN="http://127.0.0.1:$DISTWAN_PORT"
H2WAN="https://127.0.0.1:$H2WAN_PORT"
UPLOG="$W/up/registry.log"

cat >"$W/up/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $W/up/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$UP_PORT
  secret: regcache-loadtest-upstream
EOF
start_daemon upstream "$UPLOG" docker-registry serve "$W/up/config.yml"
UP_PID=$DAEMON_PID
wait_ready upstream "$UP_PID" "$UP/v2/" "$UPLOG"
log "upstream (docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}')) on $UP, PID $UP_PID"

if [ "$H2_RTT_MS" != 0 ]; then
  # The same registry storage served over TLS (Go's server speaks HTTP/2 there), under a test
  # CA, for the HTTP/2 WAN row.
  T="$W/uptls"
  mkdir -p "$T"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=compare-ca \
    -keyout "$T/ca.key" -out "$T/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$T/key.pem" -out "$T/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$T/ext.cnf"
  openssl x509 -req -in "$T/server.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial -days 2 \
    -extfile "$T/ext.cnf" -out "$T/cert.pem" 2>/dev/null
  sed -e "s|127.0.0.1:$UP_PORT|127.0.0.1:$UPTLS_PORT|" -e 's|level: info|level: warn|' "$W/up/config.yml" >"$T/config.yml"
  printf '  tls:\n    certificate: %s\n    key: %s\n' "$T/cert.pem" "$T/key.pem" >>"$T/config.yml"
  start_daemon upstream-tls "$T/registry.log" docker-registry serve "$T/config.yml"
  UPTLS_PID=$DAEMON_PID
  wait_ready upstream-tls "$UPTLS_PID" "https://127.0.0.1:$UPTLS_PORT/v2/" "$T/registry.log" --cacert "$T/ca.pem"
  log "the upstream over TLS on https://127.0.0.1:$UPTLS_PORT, PID $UPTLS_PID"
fi

cat >"$W/regcache/regcache.toml" <<EOF
[server]
listen = "127.0.0.1:$RC_PORT"

[storage]
path = "$W/regcache/data"

[cache]
tag_ttl = "60s"

[log]
level = "info"

[[upstream]]
name = "$UPSTREAM_NAME"
url = "$UP"
default = true

# The same upstream behind the WAN-like throttle (repositories named wan.local/...).
[[upstream]]
name = "wan.local"
url = "$WAN"
EOF
if [ "$H2_RTT_MS" != 0 ]; then
  cat >>"$W/regcache/regcache.toml" <<EOF

# The same upstream over TLS and HTTP/2 behind a second throttle (repositories h2wan.local/...).
[[upstream]]
name = "h2wan.local"
url = "$H2WAN"
ca_file = "$W/uptls/ca.pem"
EOF
fi
start_regcache() {
  start_daemon regcache "$W/regcache/regcache.log" "$REGCACHE_BIN" serve --config "$W/regcache/regcache.toml"
  RC_PID=$DAEMON_PID
}
start_regcache
RC_PID_FIRST=$RC_PID # the start-up measurement restarts it
wait_ready regcache "$RC_PID" "$RC/readyz" "$W/regcache/regcache.log"
log "regcache on $RC, PID $RC_PID"

cat >"$W/dist/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: $W/dist/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$DIST_PORT
  secret: regcache-loadtest-peer
proxy:
  remoteurl: $UP
EOF
start_daemon distribution "$W/dist/registry.log" docker-registry serve "$W/dist/config.yml"
DIST_PID=$DAEMON_PID
wait_ready distribution "$DIST_PID" "$DIST/v2/" "$W/dist/registry.log"
log "distribution proxy on $DIST, PID $DIST_PID"

if [ "$WAN_MIB" != 0 ]; then
  # The WAN-like upstream: the same registry behind a throttling proxy, for regcache (upstream
  # wan.local), a second Distribution proxy and the direct pull alike.
  start_daemon throttle "$W/up/throttle.log" "$LOADTEST_BIN" throttle --listen "127.0.0.1:$WAN_PORT" \
    --to "127.0.0.1:$UP_PORT" --rtt-ms "$WAN_RTT_MS" --mbit "$WAN_MBIT"
  WAN_PID=$DAEMON_PID
  wait_ready throttle "$WAN_PID" "$WAN/v2/" "$W/up/throttle.log"
  mkdir -p "$W/distwan"
  sed -e "s|$W/dist/storage|$W/distwan/storage|" -e "s|127.0.0.1:$DIST_PORT|127.0.0.1:$DISTWAN_PORT|" \
    -e "s|remoteurl: $UP|remoteurl: $WAN|" "$W/dist/config.yml" >"$W/distwan/config.yml"
  start_daemon distribution-wan "$W/distwan/registry.log" docker-registry serve "$W/distwan/config.yml"
  DISTWAN_PID=$DAEMON_PID
  wait_ready distribution-wan "$DISTWAN_PID" "$DISTWAN/v2/" "$W/distwan/registry.log"
  log "WAN-like upstream on $WAN (+$WAN_RTT_MS ms RTT, $WAN_MBIT Mbit/s), distribution proxy of it on $DISTWAN"
fi
if [ "$H2_RTT_MS" != 0 ]; then
  start_daemon throttle-h2 "$W/uptls/throttle.log" "$LOADTEST_BIN" throttle --listen "127.0.0.1:$H2WAN_PORT" \
    --to "127.0.0.1:$UPTLS_PORT" --rtt-ms "$H2_RTT_MS" --mbit "$H2_MBIT"
  wait_ready throttle-h2 "$DAEMON_PID" "$H2WAN/v2/" "$W/uptls/throttle.log" --cacert "$W/uptls/ca.pem"
  log "the TLS upstream behind +$H2_RTT_MS ms RTT, $H2_MBIT Mbit/s on $H2WAN"
fi

LT() { # loadtest with a hard time bound
  timeout 900 "$LOADTEST_BIN" "$@"
}
# run_json NAME ARGS...: runs loadtest --json, keeps its JSON in results/NAME.json (and its
# stderr in results/NAME.err); a failed run (error, wrong bytes) stops the comparison.
run_json() {
  local name="$1" b0 o0 t0
  shift
  b0="$(machine_busy_s)"
  ours_cpu
  o0="$OURS_CPU"
  t0="$(date +%s%N)"
  if ! LT --json --label "$name" "$@" >"$R/$name.json" 2>"$R/$name.err"; then
    cat "$R/$name.err" "$R/$name.json" >&2 || true
    die "loadtest run '$name' failed"
  fi
  [ -s "$R/$name.err" ] || rm -f "$R/$name.err"
  # how busy the machine was during this run, and how much of it was not this run
  ours_cpu
  jq --argjson b "$(awk -v a="$b0" -v b="$(machine_busy_s)" 'BEGIN { printf "%.2f", b - a }')" \
    --argjson o "$(awk -v a="$o0" -v b="$OURS_CPU" 'BEGIN { printf "%.2f", b - a }')" \
    --argjson w "$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')" \
    '. + {machine: {wall_s: $w, busy_cpu_s: $b, ours_cpu_s: $o, foreign_cpu_s: (([$b - $o, 0] | max) * 100 | round / 100)}}' \
    "$R/$name.json" >"$R/$name.tmp" && mv "$R/$name.tmp" "$R/$name.json"
}
j() { jq -r "$2" "$R/$1.json"; }
f3() { awk -v v="$1" 'BEGIN { printf "%.3f", v }'; }

# --- images -----------------------------------------------------------------------------
STAMP="$(date +%s)-$$"
push() { # NAME REPO TAG SEED [extra push args]
  local name="$1" repo="$2" tag="$3" seed="$4"
  shift 4
  run_json "$name" push --registry "$UP" --repo "$repo" --tag "$tag" --seed "$seed" \
    --layer-mib "$LAYER_MIB" "$@"
}
log "pushing test images (${LAYER_MIB} MiB pseudo-random layer each) to the upstream"
push push-warm bench/warm v1 "warm-$STAMP" --layer-out "$W/www/blob"
WARM_LAYER="$(j push-warm .large_layer.digest)"
WARM_SIZE="$(j push-warm .large_layer.size)"
WARM_MANIFEST="$(j push-warm .manifest_digest)"
for r in $(seq 1 "$COLD_RUNS"); do
  push "push-coldpull-$r" bench/coldpull "r$r" "coldpull-$r-$STAMP"
  push "push-coldpull-dist-$r" bench/coldpulldist "r$r" "coldpull-dist-$r-$STAMP"
done
push push-coalesce-1 bench/coalesce n1 "coalesce-1-$STAMP" --small-layers 0
for n in $CONC_LIST; do
  push "push-coalesce-$n" bench/coalesce "n$n" "coalesce-$n-$STAMP" --small-layers 0
done
push push-dist-coalesce bench/distcoalesce n8 "distcoalesce-$STAMP" --small-layers 0
if [ "$LAYERS" != 0 ]; then
  # Two images of the same shape: one for the direct pull and regcache, one for Distribution.
  for side in a b; do
    run_json "push-layers-$side" push --registry "$UP" --repo bench/layers --tag "$side" --seed "layers-$side-$STAMP" \
      --layers "$LAYERS" --layer-min-mib "$LAYERS_MIN_MIB" --layer-mib "$LAYERS_MAX_MIB" --small-layers 0
  done
fi
if [ "$WAN_MIB" != 0 ]; then
  for side in a b; do
    run_json "push-wan-$side" push --registry "$UP" --repo bench/wan --tag "$side" --seed "wan-$side-$STAMP" --layer-mib "$WAN_MIB"
  done
fi
[ "$(sha256sum "$W/www/blob" | awk '{print "sha256:" $1}')" = "$WARM_LAYER" ] || die "layer file does not match its digest"

# --- nginx ---------------------------------------------------------------------------------
# nginx started as root drops its workers to an unprivileged user (nobody / www-data), which
# cannot traverse the work directory (mktemp -d makes it 0700): every GET was 403. The workers
# run as the user that owns the work directory instead; started unprivileged, nginx keeps its
# own user and the directive is not written (it would only log a warning).
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user $(id -un) $(id -gn);"
cat >"$W/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes auto;
daemon off;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path $W/nginx/tmp/client;
  proxy_temp_path $W/nginx/tmp/proxy;
  fastcgi_temp_path $W/nginx/tmp/fastcgi;
  uwsgi_temp_path $W/nginx/tmp/uwsgi;
  scgi_temp_path $W/nginx/tmp/scgi;
  server {
    listen 127.0.0.1:$NGINX_PORT${NGINX_LISTEN_OPTS:+ $NGINX_LISTEN_OPTS};
    root $W/www;
  }
}
EOF
start_daemon nginx "$W/nginx/nginx.out" nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log"
NGINX_PID=$DAEMON_PID
wait_ready nginx "$NGINX_PID" "$NGINX/blob" "$W/nginx/error.log"
# CPU and memory of nginx are those of its workers (and the idle master).
NGINX_PIDS="$(pgrep -P "$NGINX_PID" | paste -sd, - || true)"
NGINX_WORKERS="${NGINX_PIDS//,/ }"
NGINX_PIDS="$NGINX_PID${NGINX_PIDS:+,$NGINX_PIDS}"
log "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') on $NGINX, PIDs $NGINX_PIDS (sendfile on)"

# --- upstream access-log accounting --------------------------------------------------------
log_mark() { wc -l <"$UPLOG"; }
upstream_serves() { # MARK DIGEST -> "GETS BYTES" of GET .../blobs/DIGEST answered 200/206
  tail -n "+$(($1 + 1))" "$UPLOG" | grep -F "/blobs/$2 " |
    awk '/"GET [^"]*" (200|206) / { n++; for (i = 1; i < NF; i++) if ($i ~ /^(200|206)$/ && $(i-1) ~ /HTTP\/[0-9.]+"$/) b += $(i+1) }
         END { printf "%d %.0f\n", n, b }'
}

# --- 1. warm blob --------------------------------------------------------------------------
log "priming: one cold pull of bench/warm:v1 through regcache and through distribution"
run_json prime-regcache pull --registry "$RC" --repo bench/warm --reference v1
run_json prime-dist pull --registry "$DIST" --repo bench/warm --reference v1
sleep 2 # Distribution may still be writing the blob it just streamed
run_json prime-dist-2 pull --registry "$DIST" --repo bench/warm --reference v1
if [ "$HAVE_SKOPEO" = 1 ]; then
  got="$(timeout 60 skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$RC_PORT/bench/warm:v1" | sha256sum | awk '{print "sha256:" $1}')"
  [ "$got" = "$WARM_MANIFEST" ] || die "skopeo through regcache got manifest $got, expected $WARM_MANIFEST"
  log "skopeo inspect through regcache: manifest digest matches the upstream's"
fi

for round in $(seq 1 "$WARM_ROUNDS"); do
  log "warm blob round $round/$WARM_ROUNDS: ${LAYER_MIB} MiB blob, $WARM_CONN connections, ${WARM_SECS}s per target"
  run_json "warm-nginx-$round" warm-blob --url "$NGINX/blob" -c "$WARM_CONN" -d "$WARM_SECS" \
    --digest "$WARM_LAYER" --pid "$NGINX_PIDS"
  run_json "warm-dist-$round" warm-blob --url "$DIST/v2/bench/warm/blobs/$WARM_LAYER" -c "$WARM_CONN" \
    -d "$WARM_SECS" --digest "$WARM_LAYER" --pid "$DIST_PID"
  run_json "warm-regcache-$round" warm-blob --url "$RC/v2/bench/warm/blobs/$WARM_LAYER" -c "$WARM_CONN" \
    -d "$WARM_SECS" --digest "$WARM_LAYER" --pid "$RC_PID" --reset-hwm
done
best_warm() { # TARGET -> name of the round with the highest MB/s
  local t="$1" best="" bv=-1 r v
  for r in $(seq 1 "$WARM_ROUNDS"); do
    v="$(j "warm-$t-$r" .mb_per_s)"
    if awk -v a="$v" -v b="$bv" 'BEGIN { exit !(a > b) }'; then bv="$v"; best="warm-$t-$r"; fi
  done
  echo "$best"
}
W_NGINX="$(best_warm nginx)"
W_DIST="$(best_warm dist)"
W_RC="$(best_warm regcache)"
for t in nginx dist regcache; do
  for r in $(seq 1 "$WARM_ROUNDS"); do
    log "  warm $t round $r: $(j "warm-$t-$r" '"\(.mb_per_s|floor) MB/s, \(.requests_completed) responses, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, target CPU \(.target_cpu_s_per_gb*1000|floor/1000) s/GB, errors \(.errors); other work on the machine \(.machine.foreign_cpu_s) CPU s"')"
  done
done

WRK_NGINX="-"; WRK_RC="-"; WRK_DIST="-"
wrk_mbps() { # URL -> MB/s (1e6) from wrk's "N requests in Xs, Y read" line (Y 1024-based)
  local out
  out="$(timeout $((WRK_SECS + 120)) wrk -t 2 -c "$WARM_CONN" -d "${WRK_SECS}s" --timeout 120s "$1" 2>&1)" || true
  printf '%s\n' "$out" >>"$R/wrk.txt"
  printf '%s\n' "$out" | awk '/requests in/ {
      s = $4; sub(/s,$/, "", s); v = $5; n = v; u = v; gsub(/[A-Za-z]/, "", n); gsub(/[0-9.]/, "", u);
      m = (u == "TB") ? 1099511627776 : (u == "GB") ? 1073741824 : (u == "MB") ? 1048576 : (u == "KB") ? 1024 : 1;
      if (s > 0) printf "%.1f\n", n * m / s / 1e6 }'
}
if [ "$WRK_SECS" != 0 ]; then
  log "wrk cross-check (wrk -t2 -c$WARM_CONN -d${WRK_SECS}s)"
  WRK_NGINX="$(wrk_mbps "$NGINX/blob")"
  WRK_DIST="$(wrk_mbps "$DIST/v2/bench/warm/blobs/$WARM_LAYER")"
  WRK_RC="$(wrk_mbps "$RC/v2/bench/warm/blobs/$WARM_LAYER")"
  log "  wrk MB/s: nginx ${WRK_NGINX:--}, distribution ${WRK_DIST:--}, regcache ${WRK_RC:--}"
fi

# --- 2. cold pull through regcache vs straight from the upstream ---------------------------
# page_cache_gbs NAME: GB/s of writing LAYER_MIB MiB of new data into the page cache (no
# fsync), as a cache's fill does. On a VM whose balloon driver reports free pages to the
# hypervisor, a page the kernel takes from its free lists may have to be faulted in again by
# the host: this rate then falls from several GB/s to a few hundred MB/s, and every cold row
# (regcache and Distribution both write every byte) measures that rather than the cache. The
# file stays until the end (freed at once, its pages would be cheap for the next run).
page_cache_gbs() {
  local t0 t1
  t0="$(date +%s%N)"
  dd if=/dev/zero of="$W/www/page-cache-$1" bs=256K count=$((LAYER_MIB * 4)) status=none
  t1="$(date +%s%N)"
  awk -v b=$((LAYER_MIB * 1048576)) -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f", b / ((t1 - t0) / 1e9) / 1e9 }'
}
# prefault_memory: has the kernel hand every free page but 2 GiB to one process once (dd's
# buffer, filled from /dev/zero) and take them back: afterwards its free pages are ones the
# hypervisor backs, as on a machine that has been up and busy for a while, rather than pages
# it reclaimed (a fresh or idle VM). Without it, the cold rows of a run depend on how much
# memory the run before it freed; the page-cache rate row says which state a run saw.
prefault_memory() {
  local free_mib t0
  free_mib="$(awk '/^MemFree:/ { printf "%d", $2 / 1024 }' /proc/meminfo)"
  [ "$free_mib" -gt 3072 ] || return 0
  t0="$(date +%s%N)"
  dd if=/dev/zero of=/dev/null bs="$((free_mib - 2048))M" count=1 iflag=fullblock status=none 2>/dev/null ||
    log "prefault: dd failed (ignored)"
  log "prefault: touched $((free_mib - 2048)) MiB in $(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }') s"
}
[ "$PREFAULT" = 1 ] && prefault_memory
PAGE_CACHE_BEFORE="$(page_cache_gbs before)"
log "page-cache write of new data: $PAGE_CACHE_BEFORE GB/s"
# idle_cpu PIDS: the summed CPU seconds of PIDS (comma-separated) once they are idle again:
# sampled every 200 ms until five samples in a row (a second) add under 10 ms each (at most
# 60 s). A cache's work does not end with the client's pull (Distribution's proxy fetches
# every blob a second time to store it after answering), so a cold pull's cost is counted
# until then.
cpu_sum() { local p; for p in ${1//,/ }; do pid_cpu_s "$p"; done | awk '{ s += $1 } END { printf "%.3f", s }'; }
idle_cpu() {
  local before now i=0 quiet=0
  now="$(cpu_sum "$1")"
  while [ "$i" -lt 300 ] && [ "$quiet" -lt 5 ]; do
    sleep 0.2
    before="$now"
    now="$(cpu_sum "$1")"
    i=$((i + 1))
    if awk -v a="$before" -v b="$now" 'BEGIN { exit !(b - a < 0.01) }'; then
      quiet=$((quiet + 1))
    else
      quiet=0
    fi
  done
  echo "$now"
}
declare -A RC_IDLE_CPU DIST_IDLE_CPU RC_UP_BYTES DIST_UP_BYTES
for r in $(seq 1 "$COLD_RUNS"); do
  log "cold pull $r/$COLD_RUNS of a fresh image: straight from the upstream, through regcache, through distribution"
  run_json "pull-upstream-$r" pull --registry "$UP" --repo bench/coldpull --reference "r$r" --pid "$UP_PID"
  mark="$(log_mark)"
  cpu0="$(idle_cpu "$RC_PID")"
  run_json "pull-regcache-$r" pull --registry "$RC" --repo bench/coldpull --reference "r$r" --pid "$RC_PID,$UP_PID"
  RC_IDLE_CPU[$r]="$(awk -v a="$cpu0" -v b="$(idle_cpu "$RC_PID")" 'BEGIN { printf "%.2f", b - a }')"
  sleep 0.5 # let the upstream flush its access log
  layer="$(j "push-coldpull-$r" .large_layer.digest)"
  read -r gets bytes <<<"$(upstream_serves "$mark" "$layer")"
  RC_UP_BYTES[$r]="$bytes"
  mark="$(log_mark)"
  cpu0="$(idle_cpu "$DIST_PID")"
  run_json "pull-dist-$r" pull --registry "$DIST" --repo bench/coldpulldist --reference "r$r" --pid "$DIST_PID,$UP_PID"
  DIST_IDLE_CPU[$r]="$(awk -v a="$cpu0" -v b="$(idle_cpu "$DIST_PID")" 'BEGIN { printf "%.2f", b - a }')"
  sleep 0.5
  read -r dgets dbytes <<<"$(upstream_serves "$mark" "$(j "push-coldpull-dist-$r" .large_layer.digest)")"
  DIST_UP_BYTES[$r]="$dbytes"
  log "  upstream $(f3 "$(j "pull-upstream-$r" .wall_s)") s, regcache $(f3 "$(j "pull-regcache-$r" .wall_s)") s, distribution $(f3 "$(j "pull-dist-$r" .wall_s)") s; upstream served the layer $gets time(s) ($bytes bytes) to regcache, $dgets time(s) ($dbytes bytes) to distribution; server CPU s until idle: regcache ${RC_IDLE_CPU[$r]}, distribution ${DIST_IDLE_CPU[$r]}; other work $(j "pull-upstream-$r" .machine.foreign_cpu_s) / $(j "pull-regcache-$r" .machine.foreign_cpu_s) / $(j "pull-dist-$r" .machine.foreign_cpu_s) CPU s"
done
min_of() { # PREFIX FIELD -> minimum over the cold runs
  local p="$1" f="$2" r
  for r in $(seq 1 "$COLD_RUNS"); do j "$p-$r" "$f"; done | sort -g | head -1
}
COLD_UP="$(f3 "$(min_of pull-upstream .wall_s)")"
COLD_RC="$(f3 "$(min_of pull-regcache .wall_s)")"
COLD_DIST="$(f3 "$(min_of pull-dist .wall_s)")"

# --- 8. many layers, LAYER_CONN at a time ----------------------------------------------------
# pull_pair NAME REGISTRY REPO REF [PIDS]: a pull as registry clients do it (layers LAYER_CONN
# at a time), with the CPU seconds of the servers PIDS (comma-separated) during it
pull_pair() { run_json "$1" pull --registry "$2" --repo "$3" --reference "$4" --layer-connections "$LAYER_CONN" ${5:+--pid "$5"}; }
# cpu_of NAME PID: CPU seconds of PID during run NAME (given with --pid)
cpu_of() { jq -r --argjson p "$2" '[.processes[]? | select(.pid == $p) | .cpu_s][0] // "-" | if type == "number" then (. * 100 | round / 100) else . end' "$R/$1.json"; }
blob_gets() { # MARK REPO -> GETs of blobs of REPO the upstream answered 200/206 after MARK
  tail -n "+$(($1 + 1))" "$UPLOG" | grep -F "/v2/$2/blobs/" | grep -c -E '"GET [^"]*" (200|206) ' || true
}
if [ "$LAYERS" != 0 ]; then
  log "many layers: $LAYERS layers of $LAYERS_MIN_MIB-$LAYERS_MAX_MIB MiB, $LAYER_CONN at a time: direct, regcache and distribution cold, then both warm"
  pull_pair layers-upstream "$UP" bench/layers a "$UP_PID"
  mark="$(log_mark)"
  pull_pair layers-regcache-cold "$RC" bench/layers a "$RC_PID,$UP_PID"
  sleep 0.5 # let the upstream flush its access log
  LAYERS_GETS="$(blob_gets "$mark" bench/layers)"
  pull_pair layers-dist-cold "$DIST" bench/layers b "$DIST_PID,$UP_PID"
  sleep 2 # Distribution may still be writing what it just streamed
  pull_pair layers-regcache-warm "$RC" bench/layers a
  pull_pair layers-dist-warm "$DIST" bench/layers b
  for name in layers-upstream layers-regcache-cold layers-dist-cold layers-regcache-warm layers-dist-warm; do
    log "  $name: $(f3 "$(j "$name" .wall_s)") s; other work $(j "$name" .machine.foreign_cpu_s) CPU s"
  done
  log "  upstream blob GETs during regcache's cold pull: $LAYERS_GETS (blobs: $((LAYERS + 1)))"
fi

# --- 9. WAN-like upstream -------------------------------------------------------------------
if [ "$WAN_MIB" != 0 ]; then
  log "WAN-like upstream: a ${WAN_MIB} MiB layer image through +$WAN_RTT_MS ms RTT, $WAN_MBIT Mbit/s: direct, regcache, distribution (all cold)"
  pull_pair wan-upstream "$WAN" bench/wan a
  pull_pair wan-regcache "$RC" wan.local/bench/wan a
  pull_pair wan-dist "$DISTWAN" bench/wan b
  for name in wan-upstream wan-regcache wan-dist; do
    log "  $name: $(f3 "$(j "$name" .wall_s)") s; other work $(j "$name" .machine.foreign_cpu_s) CPU s"
  done
fi
# timed_get URL [CURL ARGS...]: "SECONDS sha256:HEX" of one GET of URL, its body hashed as it
# arrives (the same client for both sides: curl, which speaks HTTP/2 over TLS to the upstream).
timed_get() {
  local url="$1" t0 t1 sum
  shift
  t0="$(date +%s%N)"
  sum="$(curl -sSf --max-time 300 "$@" "$url" | sha256sum | awk '{ print $1 }')"
  t1="$(date +%s%N)"
  awk -v a="$t0" -v b="$t1" -v s="$sum" 'BEGIN { printf "%.3f sha256:%s\n", (b - a) / 1e9, s }'
}
if [ "$H2_RTT_MS" != 0 ]; then
  H2_BLOB="$(j push-wan-a .large_layer.digest)"
  log "HTTP/2 over TLS, +$H2_RTT_MS ms RTT, $H2_MBIT Mbit/s: the ${WAN_MIB} MiB blob straight from the upstream (curl --http2), then through regcache (cold)"
  read -r H2_DIRECT sum <<<"$(timed_get "$H2WAN/v2/bench/wan/blobs/$H2_BLOB" --http2 --cacert "$W/uptls/ca.pem")"
  [ "$sum" = "$H2_BLOB" ] || die "HTTP/2 direct GET: wrong bytes ($sum)"
  read -r H2_RC sum <<<"$(timed_get "$RC/v2/h2wan.local/bench/wan/blobs/$H2_BLOB")"
  [ "$sum" = "$H2_BLOB" ] || die "HTTP/2 upstream through regcache: wrong bytes ($sum)"
  log "  direct $H2_DIRECT s, regcache $H2_RC s"
fi

# --- 3. coalescing --------------------------------------------------------------------------
coalesce() { # NAME REGISTRY PUSHNAME N [pid args]
  local name="$1" reg="$2" pushname="$3" n="$4" digest mark gets bytes
  shift 4
  digest="$(j "$pushname" .large_layer.digest)"
  mark="$(log_mark)"
  run_json "$name" cold-blob --url "$reg/v2/$(j "$pushname" .repo)/blobs/$digest" -n "$n" "$@"
  sleep 0.5 # let the upstream flush its access log line
  read -r gets bytes <<<"$(upstream_serves "$mark" "$digest")"
  jq --argjson g "$gets" --argjson b "$bytes" '. + {upstream_gets: $g, upstream_bytes: $b}' \
    "$R/$name.json" >"$R/$name.tmp" && mv "$R/$name.tmp" "$R/$name.json"
  log "  $name: $n clients, wall $(f3 "$(j "$name" .wall_s)") s, per-client $(f3 "$(j "$name" .client_s.min)")-$(f3 "$(j "$name" .client_s.max)") s, wait for the last chunk $(f3 "$(j "$name" .tail_s.median)") s, upstream served it $gets time(s) ($bytes bytes), $(j "$name" '"\(.clients - .failed)/\(.clients)"') verified; other work $(j "$name" .machine.foreign_cpu_s) CPU s"
}
log "coalescing: one cold client (reference), then ${CONC_LIST// /, } cold clients of fresh blobs"
coalesce cold-1 "$RC" push-coalesce-1 1 --pid "$RC_PID" --reset-hwm
for n in $CONC_LIST; do
  coalesce "cold-$n" "$RC" "push-coalesce-$n" "$n" --pid "$RC_PID" --reset-hwm
  # the same blob again, now cached: the serving floor for n clients (and warm peak RSS)
  coalesce "warm-$n" "$RC" "push-coalesce-$n" "$n" --pid "$RC_PID" --reset-hwm
done
log "context: 8 cold clients of a fresh blob through the distribution proxy"
coalesce dist-cold-8 "$DIST" push-dist-coalesce 8 --pid "$DIST_PID"

# --- 4. manifest storm ------------------------------------------------------------------------
log "manifest storm: GET/HEAD by digest and by tag, $STORM_CONN connections, ${STORM_SECS}s per target"
mark="$(log_mark)"
run_json storm-regcache manifest-storm --registry "$RC" --repo bench/warm --tag v1 --digest "$WARM_MANIFEST" \
  -c "$STORM_CONN" -d "$STORM_SECS" --pid "$RC_PID" --reset-hwm
UP_REQ_RC="$(tail -n "+$((mark + 1))" "$UPLOG" | grep -c -F '/v2/bench/warm/manifests/' || true)"
mark="$(log_mark)"
run_json storm-dist manifest-storm --registry "$DIST" --repo bench/warm --tag v1 --digest "$WARM_MANIFEST" \
  -c "$STORM_CONN" -d "$STORM_SECS" --pid "$DIST_PID"
UP_REQ_DIST="$(tail -n "+$((mark + 1))" "$UPLOG" | grep -c -F '/v2/bench/warm/manifests/' || true)"
log "  regcache $(j storm-regcache '"\(.req_per_s|floor) req/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, errors \(.errors), other work \(.machine.foreign_cpu_s) CPU s"'); upstream manifest requests during it: $UP_REQ_RC"
log "  distribution $(j storm-dist '"\(.req_per_s|floor) req/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, errors \(.errors), other work \(.machine.foreign_cpu_s) CPU s"'); upstream manifest requests during it: $UP_REQ_DIST"

# --- 7. start-up with many cached blobs --------------------------------------------------------
STARTUP_S="-"
if [ "$STARTUP_BLOBS" != 0 ]; then
  log "start-up: stopping regcache, seeding $STARTUP_BLOBS blobs into its store, starting it again"
  stop_pid regcache "$RC_PID"
  run_json seed-store seed-store --dir "$W/regcache/data/blobs/$UPSTREAM_NAME" --count "$STARTUP_BLOBS" --seed "$STAMP"
  sync
  t0="$(date +%s%N)"
  start_regcache
  ready=0
  for _ in $(seq 1 3000); do # at most ~30 s
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$RC/readyz" || true)" = 200 ]; then ready=1; break; fi
    sleep 0.01
  done
  t1="$(date +%s%N)"
  [ "$ready" = 1 ] || die "regcache not ready 30 s after start with $STARTUP_BLOBS blobs"
  STARTUP_S="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')"
  seeded="$(j seed-store .first_digest)"
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$RC/v2/bench/any/blobs/$seeded")"
  [ "$code" = 200 ] || die "a seeded blob was not served after the restart (HTTP $code)"
  log "  ready after $STARTUP_S s (from exec to the first 200 of /readyz); a seeded blob is served"
fi

PAGE_CACHE_AFTER="$(page_cache_gbs after)"
log "page-cache write of new data: $PAGE_CACHE_AFTER GB/s"

# --- the targets table --------------------------------------------------------------------------
TSV="$R/targets.tsv"
printf 'target\tmeasure\tregcache\treference\tratio\tgoal\tresult\n' >"$TSV"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TSV"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
pass_ge() { awk -v r="$1" -v g="$2" 'BEGIN { print (r != "-" && r + 0 >= g) ? "PASS" : "FAIL" }'; }
pass_le() { awk -v r="$1" -v g="$2" 'BEGIN { print (r != "-" && r + 0 <= g) ? "PASS" : "FAIL" }'; }
time_row() { # LABEL WHAT SECONDS REFERENCE_SECONDS MAX_RATIO|report: a row of two times
  local r; r="$(ratio "$3" "$4")"
  if [ "$5" = report ]; then
    row "$1" "$2" "$(f3 "$3") s" "$(f3 "$4") s" "$r" "report" "INFO"
  else
    row "$1" "$2" "$(f3 "$3") s" "$(f3 "$4") s" "$r" "<= $5" "$(pass_le "$r" "$5")"
  fi
}
mbs() { printf '%.0f MB/s' "$1"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
peak_kib() { # RESULT -> the run's peak RSS of its (one) watched process in KiB: VmHWM when it
  # was reset before the run (exact), else the maximum of the samples
  j "$1" "[.processes[] | if .hwm_reset then ([.vm_hwm_kib, .peak_rss_sampled_kib] | max) else .peak_rss_sampled_kib end] | max"
}

rc_w="$(j "$W_RC" .mb_per_s)"; ng_w="$(j "$W_NGINX" .mb_per_s)"; di_w="$(j "$W_DIST" .mb_per_s)"
r="$(ratio "$rc_w" "$ng_w")"
row "1 warm blob vs nginx" "${LAYER_MIB} MiB, $WARM_CONN conns, best of $WARM_ROUNDS" "$(mbs "$rc_w")" "$(mbs "$ng_w")" "$r" ">= 0.95" "$(pass_ge "$r" 0.95)"
r="$(ratio "$rc_w" "$di_w")"
row "1 warm blob vs distribution" "${LAYER_MIB} MiB, $WARM_CONN conns, best of $WARM_ROUNDS" "$(mbs "$rc_w")" "$(mbs "$di_w")" "$r" ">= 1.30" "$(pass_ge "$r" 1.30)"
if [ "$WRK_SECS" != 0 ] && [ -n "$WRK_RC" ] && [ -n "$WRK_NGINX" ]; then
  r="$(ratio "$WRK_RC" "$WRK_NGINX")"
  row "1 (wrk cross-check) vs nginx" "wrk -t2 -c$WARM_CONN ${WRK_SECS}s" "$(mbs "$WRK_RC")" "$(mbs "$WRK_NGINX")" "$r" ">= 0.95" "$(pass_ge "$r" 0.95)"
  if [ -n "$WRK_DIST" ]; then
    r="$(ratio "$WRK_RC" "$WRK_DIST")"
    row "1 (wrk cross-check) vs distribution" "wrk -t2 -c$WARM_CONN ${WRK_SECS}s" "$(mbs "$WRK_RC")" "$(mbs "$WRK_DIST")" "$r" ">= 1.30" "$(pass_ge "$r" 1.30)"
  fi
fi
# cold_row LABEL FACTOR ADD: regcache's cold pull against FACTOR x direct + ADD seconds
cold_row() {
  local limit
  limit="$(awk -v u="$COLD_UP" -v f="$2" -v a="$3" 'BEGIN { printf "%.3f", u * f + a }')"
  row "$1" "1 client, min of $COLD_RUNS; goal = ${2} x direct + ${3} s = $limit s" "${COLD_RC} s" "${COLD_UP} s" \
    "$(ratio "$COLD_RC" "$COLD_UP")" "<= $2x+$3s" "$(pass_le "$COLD_RC" "$limit")"
}
cold_row "2 cold pull vs upstream direct" 1.5 0.05
cold_row "2 cold pull vs upstream direct (stretch)" 1.05 0.15
r="$(ratio "$COLD_RC" "$COLD_DIST")"
row "2 cold pull vs distribution cold" "1 client, min of $COLD_RUNS (a fresh image each)" "${COLD_RC} s" "${COLD_DIST} s" "$r" "<= 0.80" "$(pass_le "$r" 0.80)"
# cpu_row LABEL DIRECT REGCACHE DIST: where a cold pull's CPU seconds go, per side
cpu_row() {
  row "$1" "CPU s: server + upstream + client; direct: upstream $(cpu_of "$2" "$UP_PID") + client $(j "$2" .client_cpu_s)" \
    "$(cpu_of "$3" "$RC_PID_FIRST") + $(cpu_of "$3" "$UP_PID") + $(j "$3" .client_cpu_s)" \
    "$(cpu_of "$4" "$DIST_PID") + $(cpu_of "$4" "$UP_PID") + $(j "$4" .client_cpu_s)" "-" "report" "INFO"
}
cpu_row "2 cold pull: CPU s (regcache vs distribution)" pull-upstream-1 pull-regcache-1 pull-dist-1
row "2 cold pull: server CPU s until idle" "the server alone, from before the pull until it is idle again (run 1)" \
  "${RC_IDLE_CPU[1]}" "${DIST_IDLE_CPU[1]}" "$(ratio "${RC_IDLE_CPU[1]}" "${DIST_IDLE_CPU[1]}")" "report" "INFO"
row "2 cold pull: upstream bytes of the layer" "sent by the upstream per cold pull, until idle (run 1; layer ${LAYER_MIB} MiB)" \
  "${RC_UP_BYTES[1]}" "${DIST_UP_BYTES[1]}" "$(ratio "${RC_UP_BYTES[1]}" "${DIST_UP_BYTES[1]}")" "report" "INFO"
row "2 page-cache write of new data" "GB/s before the cold pulls / at the end (dd, ${LAYER_MIB} MiB, no fsync)" "$PAGE_CACHE_BEFORE" "$PAGE_CACHE_AFTER" "-" "report" "INFO"
T1="$(j cold-1 .wall_s)"
row "3 one cold client (reference)" "1 client; its last chunk waited $(f3 "$(j cold-1 .tail_s.median)") s (verify+commit)" "$(f3 "$T1") s" "-" "-" "-" "INFO"
for n in $CONC_LIST; do
  gets="$(j "cold-$n" .upstream_gets)"
  ok="$(j "cold-$n" .all_ok)"
  res=FAIL; { [ "$gets" = 1 ] && [ "$ok" = true ]; } && res=PASS
  row "3 coalescing: upstream serves, $n cold" "GETs of the blob upstream (all clients verified: $ok)" "$gets" "-" "$gets" "== 1" "$res"
done
for n in $CONC_LIST; do
  wall="$(j "cold-$n" .wall_s)"
  r="$(ratio "$wall" "$T1")"
  row "3 coalescing: $n cold clients' wall time" "vs 1 cold client; warm $n: $(printf '%.3f' "$(j "warm-$n" .wall_s)") s" "$(printf '%.3f s' "$wall")" "$(printf '%.3f s' "$T1")" "$r" "<= 1.20" "$(pass_le "$r" 1.20)"
done
if [ "$LAYERS" != 0 ]; then
  what="$LAYERS layers of $LAYERS_MIN_MIB-$LAYERS_MAX_MIB MiB, $LAYER_CONN at a time"
  lc="$(j layers-regcache-cold .wall_s)"; lu="$(j layers-upstream .wall_s)"; ld="$(j layers-dist-cold .wall_s)"
  time_row "8 layers cold vs upstream direct" "$what" "$lc" "$lu" 1.20
  time_row "8 layers cold vs distribution cold" "$what" "$lc" "$ld" report
  cpu_row "8 layers cold: CPU s (regcache vs distribution)" layers-upstream layers-regcache-cold layers-dist-cold
  lw="$(j layers-regcache-warm .wall_s)"; ldw="$(j layers-dist-warm .wall_s)"
  time_row "8 layers warm vs distribution warm" "$what (time ratio)" "$lw" "$ldw" 1.00
  res=FAIL; [ "$LAYERS_GETS" = "$((LAYERS + 1))" ] && res=PASS
  row "8 layers: upstream fetches per blob" "blob GETs upstream / blobs, regcache cold" "$LAYERS_GETS" "$((LAYERS + 1))" "$(ratio "$LAYERS_GETS" "$((LAYERS + 1))")" "== 1" "$res"
fi
if [ "$WAN_MIB" != 0 ]; then
  what="${WAN_MIB} MiB layer, +$WAN_RTT_MS ms RTT, $WAN_MBIT Mbit/s"
  wr="$(j wan-regcache .wall_s)"; wu="$(j wan-upstream .wall_s)"; wd="$(j wan-dist .wall_s)"
  time_row "9 WAN cold vs upstream direct" "$what" "$wr" "$wu" 1.05
  time_row "9 WAN cold vs distribution" "$what" "$wr" "$wd" report
fi
if [ "$H2_RTT_MS" != 0 ]; then
  time_row "9 WAN HTTP/2+TLS blob cold vs direct" "${WAN_MIB} MiB blob, +$H2_RTT_MS ms RTT, $H2_MBIT Mbit/s, curl" "$H2_RC" "$H2_DIRECT" 1.05
fi
rc_rps="$(j storm-regcache .req_per_s)"; di_rps="$(j storm-dist .req_per_s)"
r="$(ratio "$rc_rps" "$di_rps")"
row "4 manifests req/s vs distribution" "$STORM_CONN conns; p99 $(j storm-regcache .latency.p99_ms) vs $(j storm-dist .latency.p99_ms) ms; errors $(j storm-regcache .errors)/$(j storm-dist .errors)" "$(printf '%.0f req/s' "$rc_rps")" "$(printf '%.0f req/s' "$di_rps")" "$r" ">= 3.00" "$(pass_ge "$r" 3)"
last_n="${CONC_LIST##* }"
for what in "cold-$last_n:$last_n clients cold" "warm-$last_n:$last_n clients warm" "$W_RC:$WARM_CONN conns warm-blob"; do
  name="${what%%:*}"
  k="$(peak_kib "$name")"
  m="$(mib "$k")"
  row "5 peak RSS, $name" "${what#*:}, ${LAYER_MIB} MiB blob" "$m MiB" "64 MiB" "$m" "<= 64" "$(pass_le "$m" 64)"
done
rss_list=""
for n in $CONC_LIST; do rss_list="$rss_list $n:$(mib "$(peak_kib "cold-$n")")"; done
row "5 peak RSS by cold client count" "MiB by N clients (must not grow with N)" "${rss_list# }" "-" "-" "report" "INFO"
rc_cpu="$(j "$W_RC" .target_cpu_s_per_gb)"; ng_cpu="$(j "$W_NGINX" .target_cpu_s_per_gb)"; di_cpu="$(j "$W_DIST" .target_cpu_s_per_gb)"
r="$(ratio "$rc_cpu" "$ng_cpu")"
row "6 CPU s per GB served warm" "regcache vs nginx (distribution $(printf '%.3f' "$di_cpu"))" "$(printf '%.3f s/GB' "$rc_cpu")" "$(printf '%.3f s/GB' "$ng_cpu")" "$r" "report" "INFO"
if [ "$STARTUP_S" != "-" ]; then
  row "7 start-up with $STARTUP_BLOBS cached blobs" "exec to /readyz 200" "$STARTUP_S s" "1 s" "$STARTUP_S" "< 1" "$(awk -v s="$STARTUP_S" 'BEGIN { print (s < 1) ? "PASS" : "FAIL" }')"
fi
dgets="$(j dist-cold-8 .upstream_gets)"
row "context: distribution, 8 cold" "upstream GETs of the blob; wall $(printf '%.3f' "$(j dist-cold-8 .wall_s)") s" "-" "$dgets" "-" "-" "INFO"

ours_cpu
FOREIGN="$(awk -v b0="$BUSY_START" -v b1="$(machine_busy_s)" -v o0="$OURS_START" -v o1="$OURS_CPU" -v t0="$T_START" -v t1="$(date +%s%N)" -v n="$(nproc)" \
  'BEGIN { f = (b1 - b0) - (o1 - o0); if (f < 0) f = 0; a = (t1 - t0) / 1e9 * n; printf "%.1f CPU s of %.0f available (%.0f%%)", f, a, 100 * f / a }')"

{
  printf '\n# regcache performance comparison, %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '# machine: %s cores (%s), %s MiB RAM, %s; load average at start: %s\n' "$(nproc)" \
    "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
    "$(awk '/MemTotal/ { printf "%d", $2 / 1024 }' /proc/meminfo)" "$(uname -sr)" "$LOAD_BEFORE"
  printf '# regcache %s; nginx %s; docker-registry %s; all on 127.0.0.1, clients on the same cores\n' \
    "$("$REGCACHE_BIN" --version 2>/dev/null | awk '{print $2}')" "$(nginx -v 2>&1 | sed 's/.*nginx\///')" \
    "$(docker-registry --version 2>/dev/null | awk '{print $3}')"
  column -t -s $'\t' "$TSV" 2>/dev/null || cat "$TSV"
  printf '# load average at the end: %s (numbers taken while other work runs are not comparable)\n' \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf '# CPU used by other processes on this machine during the run: %s\n' "$FOREIGN"
  printf '# every run: %s/*.json\n' "$R"
} | tee "$R/targets.txt"

# The smoke run is a check, not a benchmark: speed rows are only reported, but a correctness
# row (one upstream fetch per blob, every body verified) must pass.
if [ "$SMOKE" = 1 ]; then
  bad="$(awk -F'\t' 'NR > 1 && $6 == "== 1" && $7 != "PASS" { print "  " $1 }' "$TSV")"
  [ -z "$bad" ] || die "smoke run: correctness rows failed:
$bad"
  log "smoke run: every correctness row passed"
fi
