# Shared by the benchmark scripts (sourced, from the repository root): builds the release
# binary into BIN, makes a scratch folder WORK, and on exit stops every process whose PID was
# added to PIDS, then removes WORK.
cargo build --release --quiet --bin mxpipe
BIN=target/release/mxpipe
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
