#!/usr/bin/env bash
# The C benchmarks (`make bench` runs this): enqueue rate from 1 and 4 threads, and end-to-end
# delivery to Postfix's smtp-sink next to `mxpipe bench` for the same messages when the mxpipe
# binary is built (cargo build --release). Prints the "result ..." lines. Not a test.
set -euo pipefail

BUILD=${BUILD:?set by the Makefile}
MESSAGES=${MESSAGES:-1000000}
E2E_MESSAGES=${E2E_MESSAGES:-100000}
SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
user=()
[[ $(id -u) -eq 0 ]] && user=(-u nobody)
"$SINK" "${user[@]}" "127.0.0.1:$port" 1024 &
sink_pid=$!
# (|| true: under set -e, wait's 143 for the killed sink would become the script's status)
trap 'kill "$sink_pid" 2>/dev/null; wait "$sink_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
done
relay=127.0.0.1:$port

for loop in idle delivering; do
    for threads in 1 4; do
        for api in body bytes; do
            "$BUILD/shared/bench_enqueue" "$relay" enqueue "$threads" "$api" "$MESSAGES" "$loop"
        done
    done
done
"$BUILD/shared/bench_enqueue" "$relay" e2e "$E2E_MESSAGES" 2048 20
if [[ -x $TARGET_DIR/release/mxpipe ]]; then
    echo "mxpipe bench --messages $E2E_MESSAGES --size 2048 --connections 20 --to $relay:"
    "$TARGET_DIR/release/mxpipe" bench --messages "$E2E_MESSAGES" --size 2048 --connections 20 \
        --to "$relay"
fi
