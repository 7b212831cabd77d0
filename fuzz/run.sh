#!/usr/bin/env bash
# Builds the libFuzzer targets on a stable toolchain (the instrumentation flags cargo-fuzz
# passes, without its sanitizer, which needs nightly) and runs each for a bounded time.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run. With cargo-fuzz
# installed, `cargo fuzz run <target> --sanitizer none` runs the same targets.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(reference digest route range www_authenticate manifest schema1 config archive layout_index)
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# The same dependency versions as regcache's own build: its lock file, plus what libFuzzer
# needs (added by cargo), so a dependency added to regcache never leaves this one stale.
cp ../Cargo.lock Cargo.lock
# An explicit --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target "$host"

for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "fuzzing $target for ${seconds}s"
  "target/$host/release/$target" -max_total_time="$seconds" -max_len=65536 \
    -artifact_prefix="artifacts/$target/" "corpus/$target"
done
