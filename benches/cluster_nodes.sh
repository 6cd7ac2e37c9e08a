#!/usr/bin/env bash
# Scale-out figures (README "Scale-out through Redis"): bash benches/cluster_nodes.sh [N]
#
# Against Postfix's smtp-sink on loopback, N one-recipient messages (default 30,000):
#   local   `mxpipe bench --to SINK` (the engine alone)
#   nodes=K K `mxpipe node` processes (1, 2, 3), each with its own sink, sharing N entries
#           put in by `mxpipe enqueue --per-entry 1`
# For each: msgs/s (first to last outcome, from the outcomes stream's IDs), client CPU per
# message (user+sys of the node processes, from /usr/bin/time), Redis commands per message
# (INFO commandstats, calls summed, before/after) and round trips per message (the nodes' own
# count: commands or pipelines sent). Needs redis-server, redis-cli, smtp-sink and a release
# build (cargo build --release). Every process it starts is stopped by its PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-30000}
BIN=target/release/mxpipe
DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RPORT=$(port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PIDS+=($!)
SINKS=()
for i in 1 2 3; do
    p=$(port)
    /usr/sbin/smtp-sink $([[ $(id -u) -eq 0 ]] && echo -u nobody) "127.0.0.1:$p" 1024 >/dev/null 2>&1 &
    PIDS+=($!)
    SINKS+=("127.0.0.1:$p")
done
sleep 0.5
R() { redis-cli -p "$RPORT" "$@"; }
for i in $(seq 1 "$N"); do echo "r$i@example.net"; done >"$DIR/list.txt"
printf 'From: news@example.org\r\nSubject: bench\r\n\r\n%s\r\n' "$(head -c 700 /dev/zero | tr '\0' x)" >"$DIR/m.eml"

echo "local: $($BIN bench --messages "$N" --size 1024 --to "${SINKS[0]}" | grep '^result')"

calls() { R info commandstats | awk -F'[=,:]' '/^cmdstat_/ {s+=$3} END {print s}'; }
for K in 1 2 3; do
    R flushall >/dev/null
    $BIN enqueue --redis "redis://127.0.0.1:$RPORT" --from news@example.org --to-file "$DIR/list.txt" \
        --per-entry 1 "$DIR/m.eml" >/dev/null
    before=$(calls)
    NODE_PIDS=()
    for k in $(seq 1 "$K"); do
        /usr/bin/time -f "%U %S" -o "$DIR/time.$k" $BIN node --redis "redis://127.0.0.1:$RPORT" \
            --relay "${SINKS[$((k - 1))]}" --consumer "n$k" --exit-when-idle 1 >"$DIR/node.$k" 2>/dev/null &
        NODE_PIDS+=($!)
    done
    for p in "${NODE_PIDS[@]}"; do wait "$p"; done
    after=$(calls)
    cpu=$(cat "$DIR"/time.* | awk '{s+=$1+$2} END {print s}')
    trips=$(cat "$DIR"/node.* | sed -n 's/.*round_trips=\([0-9]*\).*/\1/p' | awk '{s+=$1} END {print s}')
    R --raw xrange '{mxpipe}:outcomes' - + | python3 -c '
import sys, json
lines = sys.stdin.read().split("\n")
first = last = None; n = 0
for i, line in enumerate(lines):
    if line.startswith("["):
        ms = int(lines[i - 2].split("-")[0])
        first = ms if first is None else first; last = ms
        n += sum(1 for o in json.loads(line) if o["status"] == "delivered")
span = max(last - first, 1) / 1000
print(f"nodes={sys.argv[1]} delivered={n} msgs_per_s={n / span:.0f} cpu_us_per_msg={float(sys.argv[2]) * 1e6 / n:.1f} "
      f"redis_commands_per_msg={(int(sys.argv[4]) - int(sys.argv[3])) / n:.4f} round_trips_per_msg={int(sys.argv[5]) / n:.4f}")
' "$K" "$cpu" "$before" "$after" "$trips"
    rm -f "$DIR"/time.* "$DIR"/node.*
done
