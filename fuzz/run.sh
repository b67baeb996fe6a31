#!/usr/bin/env bash
# Runs the fuzz targets: `fuzz/run.sh [SECONDS] [TARGET...]` (default 30 s,
# every target; with RUNS=N set, each stops after N executions if that comes
# first: `RUNS=10000000 fuzz/run.sh 7200` is the long run), one after the other, each from its checked-in seed corpus
# (fuzz/corpus/<target>, read only) plus the inputs earlier runs found
# (fuzz/target/corpus/<target>, gitignored). A crash fails the script and
# leaves the input in fuzz/artifacts/<target>/. `.ci/run` calls it with 30;
# docs/reliability.md has the long-run numbers it printed.
#
# Stable toolchain: cargo-fuzz's `-s none` passes no -Z flag (only the
# sancov coverage passes, which stable rustc accepts), so no nightly and no
# RUSTC_BOOTSTRAP are needed; the price is no AddressSanitizer, which safe
# Rust (the workspace forbids unsafe) barely needs.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config admin_body etcd_value state_file core_ops http_head client_hello hash_key cidr request_headers upstream_response client_request)
fi
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (once; about 1-2 min)"
    cargo install cargo-fuzz --locked
fi
cargo fuzz build -s none -O

for t in "${targets[@]}"; do
    found="$CARGO_TARGET_DIR/corpus/$t"
    mkdir -p "$found"
    log="$CARGO_TARGET_DIR/fuzz-$t.log"
    start=$(date +%s)
    if ! cargo fuzz run -s none -O "$t" "$found" "corpus/$t" -- \
        -max_total_time="$secs" ${RUNS:+-runs="$RUNS"} -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "== fuzz $t: FAILED (input in fuzz/artifacts/$t/)"
        exit 1
    fi
    execs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -a -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    echo "== fuzz $t: ok, $execs executions in $(($(date +%s) - start)) s, $cov"
done
