#!/usr/bin/env bash
# scale.sh - a store of many small blobs (issue 23): first start, restart, eviction of half,
# `verify`, each with its time and the process's peak RSS, printed as a markdown table.
#
# Usage (from the repository root, after `cargo build --release`):
#   loadtest/scale.sh                 1 000 000 blobs (about 15 minutes on 2 cores)
#   SCALE_BLOBS=20000 loadtest/scale.sh   a quick run
#
# What it does, all under $WORK (default: a new directory under $TMPDIR or /tmp, removed at
# the end unless KEEP_WORK=1):
#   1. `loadtest seed-store` writes SCALE_BLOBS small blobs (about 40 bytes, each under its
#      sha256) in regcache's store layout: a store with no index records (a new index, one
#      rebuilt after `verify --repair`, a migrated store).
#   2. First start, no budget: time from exec to the first 200 of /readyz, time until the
#      store walk has recorded every blob ("store usage counted"), peak and final RSS; the
#      index's size on disk per blob after a clean stop.
#   3. Restart: the same figures (RSS after start-up: once the walk is done).
#   4. Restart with `max_size` = the store's bytes, watermarks 0.9 / 0.5: eviction of half.
#      Its log line's elapsed_ms (until the low watermark: files out of the store) and the
#      trash's (until their space is freed), peak RSS.
#   5. `regcache verify` (stopped server): time and peak RSS.
#
# Settings (environment): SCALE_BLOBS=1000000, INDEX_CACHE (storage.index_cache; default:
# regcache's), REGCACHE_BIN (default target/release/regcache), LOADTEST_BIN (default
# loadtest/target/release/loadtest, built when missing), WORK, KEEP_WORK=1, SCALE_REUSE=1
# (with WORK and KEEP_WORK: take the blobs a previous run left, whole, instead of seeding),
# SCALE_LOG (the servers' RUST_LOG, default info; `info,regcache_cache::upkeep=debug` logs each
# eviction round's choose_ms and remove_ms).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'scale.sh: error: %s\n' "$*" >&2; exit 1; }

BLOBS="${SCALE_BLOBS:-1000000}"
REGCACHE_BIN="${REGCACHE_BIN:-$ROOT/target/release/regcache}"
LOADTEST_BIN="${LOADTEST_BIN:-$ROOT/loadtest/target/release/loadtest}"
[ -x "$REGCACHE_BIN" ] || die "no $REGCACHE_BIN: run cargo build --release first"
if [ ! -x "$LOADTEST_BIN" ]; then
  log "building the loadtest tool"
  cargo build --release --manifest-path "$ROOT/loadtest/Cargo.toml" >&2
fi
W="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/regcache-scale.XXXXXX")}"
mkdir -p "$W"
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
status_kb() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$PID/status"; }

# config PATH [extra [storage] lines]
config() {
  {
    printf '[server]\nlisten = "127.0.0.1:0"\n[storage]\npath = "%s"\n' "$W/data"
    [ -n "${INDEX_CACHE:-}" ] && printf 'index_cache = "%s"\n' "$INDEX_CACHE"
    [ -n "${2:-}" ] && printf '%s\n' "$2"
    printf '[[upstream]]\nname = "registry.test"\nurl = "http://127.0.0.1:9"\ndefault = true\n'
  } > "$1"
}

# start CONFIG LOG: runs regcache; sets PID, READY_S (exec to /readyz 200) and PORT.
start() {
  local t0 port=""
  t0=$(now)
  RUST_LOG="${SCALE_LOG:-info}" "$REGCACHE_BIN" serve --config "$1" > "$2" 2>&1 &
  PID=$!
  for _ in $(seq 1 3000); do
    port=$(sed -n 's/.*regcache listening address=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$2" | head -n1)
    [ -n "$port" ] && curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && break
    kill -0 "$PID" 2>/dev/null || die "regcache exited: $(tail -n 5 "$2")"
    sleep 0.01
  done
  READY_S=$(secs "$t0" "$(now)")
  PORT=$port
  START_T=$t0
}

# wait_log LOG PATTERN SECONDS
wait_log() {
  for _ in $(seq 1 $(($3 * 10))); do
    grep -q "$2" "$1" && return 0
    kill -0 "$PID" 2>/dev/null || die "regcache exited: $(tail -n 5 "$1")"
    sleep 0.1
  done
  die "no \"$2\" in $1 after $3 s"
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }

field() { sed -n "s/.*$2.* $3=\([0-9.]*\).*/\1/p" "$1" | tail -n1; }

if [ "${SCALE_REUSE:-0}" = 1 ] && [ -d "$W/data/blobs/registry.test" ]; then
  log "reusing the blobs under $W/data (index removed)"
  rm -rf "$W/data/index" "$W/data/trash"
else
  log "seeding $BLOBS blobs"
  "$LOADTEST_BIN" seed-store --dir "$W/data/blobs/registry.test" --count "$BLOBS" >&2
fi

# startup NAME: starts with no budget, waits for the walk, and sets NAME_READY, NAME_WALK (s
# from exec), NAME_PEAK and NAME_RSS (MiB); stops.
startup() {
  start "$W/plain.toml" "$W/$1.log"
  wait_log "$W/$1.log" "store usage counted" 1200
  printf -v "${1}_READY" '%s' "$READY_S"
  printf -v "${1}_WALK" '%s' "$(secs "$START_T" "$(now)")"
  printf -v "${1}_PEAK" '%s' "$(mib "$(status_kb VmHWM)")"
  printf -v "${1}_RSS" '%s' "$(mib "$(status_kb VmRSS)")"
  stop
}

log "first start (no index records)"
config "$W/plain.toml"
startup FIRST
# The store's bytes as regcache counts them (files only, not directories).
BYTES=$(field "$W/FIRST.log" "store usage counted" bytes)
INDEX_BYTES=$(du -s -B1 "$W/data/index" | cut -f1)
PER_BLOB=$(awk -v i="$INDEX_BYTES" -v n="$BLOBS" 'BEGIN { printf "%.0f", i / n }')

log "restart"
startup RESTART

log "eviction of half (max_size = ${BYTES}B)"
config "$W/budget.toml" "max_size = \"${BYTES}B\"
high_watermark = 0.9
low_watermark = 0.5"
start "$W/budget.toml" "$W/evict.log"
wait_log "$W/evict.log" "evicted to stay under the storage budget" 1200
wait_log "$W/evict.log" "freed the space of removed blobs" 1200
EVICTED=$(field "$W/evict.log" "evicted to stay" files)
EVICT_MS=$(field "$W/evict.log" "evicted to stay" elapsed_ms)
TRASH_MS=$(field "$W/evict.log" "freed the space" elapsed_ms)
EVICT_PEAK=$(mib "$(status_kb VmHWM)")
stop
EVICT_S=$(awk -v m="$EVICT_MS" 'BEGIN { printf "%.2f", m / 1000 }')
TRASH_S=$(awk -v m="$TRASH_MS" 'BEGIN { printf "%.2f", m / 1000 }')
EVICT_RATE=$(awk -v n="$EVICTED" -v m="$EVICT_MS" 'BEGIN { printf "%.0f", n / (m / 1000) }')

log "verify"
VERIFY=$(python3 - "$REGCACHE_BIN" "$W/plain.toml" <<'PY'
import resource, subprocess, sys, time
t0 = time.monotonic()
done = subprocess.run([sys.argv[1], "verify", "--config", sys.argv[2]], capture_output=True)
elapsed = time.monotonic() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"{done.returncode} {elapsed:.2f} {peak / 1024:.0f}")
PY
)
read -r VERIFY_RC VERIFY_S VERIFY_PEAK <<< "$VERIFY"
[ "$VERIFY_RC" = 0 ] || die "verify exited $VERIFY_RC"

cat <<EOF
| $BLOBS blobs | time | peak RSS | RSS after |
|---|---|---|---|
| first start, no index records | /readyz $FIRST_READY s, walk $FIRST_WALK s | $FIRST_PEAK MiB | $FIRST_RSS MiB |
| index on disk | $PER_BLOB bytes per blob | | |
| restart | /readyz $RESTART_READY s, walk $RESTART_WALK s | $RESTART_PEAK MiB | $RESTART_RSS MiB |
| eviction of half ($EVICTED files) | low watermark $EVICT_S s ($EVICT_RATE/s), space freed $TRASH_S s later | $EVICT_PEAK MiB | |
| verify ($((BLOBS - EVICTED)) files) | $VERIFY_S s | $VERIFY_PEAK MiB | |
EOF
