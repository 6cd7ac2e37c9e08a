#!/usr/bin/env bash
# Scale-out figures (README "Scale-out through Redis"): bash benches/cluster_nodes.sh [N]
#
# Against Postfix's smtp-sink on loopback, N one-recipient messages of 1 KB (default 30,000):
#   local   `mxpipe bench --to SINK` (the engine alone)
#   nodes=K K `mxpipe node` processes (1, 2, 3), each with its own sink.
# MODE=live (the default): the nodes are started first and idle; then `mxpipe enqueue
#   --per-entry 1` puts N entries in while they work (the producer shares the 2 cores).
# NODE_ARGS: more options for every node (e.g. "--max-in-flight 10000").
# MODE=backlog: the N entries are enqueued first (a campaign put in, then worked): the nodes
#   start on a full stream, and the producer's CPU is not in the window.
# Both are clocked alike: from the first submission to the last final outcome (the engine
# alone: its own clock; nodes: live, from just before the enqueue starts, backlog, from the
# earliest `first_read_at_ms` of the nodes' summaries, to the ID of the last outcomes entry, on
# Redis's clock: the outcomes' write latency, up to a flush period, is in it). CPU per message
# is of the mxpipe process(es) only, over the same window: the engine's own getrusage; the
# nodes' user+sys from /proc/PID/stat read just before the enqueue (backlog: as they start)
# and when the work is done (every entry acknowledged), so the idle wait before exit does not
# count. redis-server's CPU over that window is shown
# apart (redis_cpu_us_per_msg). Redis commands per message (INFO commandstats over the window,
# so the producer's XADD of each entry is in it when live, not in a backlog; the bench's own
# polling is left out) and round
# trips per message (the nodes' own count). Needs redis-server,
# redis-cli, smtp-sink and a release build (cargo build --release). Every process it starts is
# stopped by its PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-30000}
MODE=${MODE:-live}
[[ $MODE == live || $MODE == backlog ]] || { echo "MODE is live or backlog" >&2; exit 2; }
BIN=${MXPIPE_BIN:-target/release/mxpipe}
DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# user+sys clock ticks of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

RPORT=$(port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
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

# Commands the nodes sent: every command's calls, less the bench's own INFO and XINFO.
calls() {
    R info commandstats | awk -F'[=,:]' '/^cmdstat_/ && !/^cmdstat_(info|xinfo)/ {s+=$3} END {print s}'
}
# Every entry read and acknowledged, nothing deferred.
all_acked() {
    local info
    info=$(R xinfo groups '{mxpipe}:work' | tr '\n' ' ')
    [[ $info =~ pending\ ([0-9]+).*lag\ ([0-9]+) ]] || return 1
    [[ ${BASH_REMATCH[1]} -eq 0 && ${BASH_REMATCH[2]} -eq 0 ]]
}
for K in 1 2 3; do
    R flushall >/dev/null
    R xgroup create '{mxpipe}:work' nodes 0 mkstream >/dev/null
    enqueue() {
        $BIN enqueue --redis "redis://127.0.0.1:$RPORT" --from news@example.org \
            --to-file "$DIR/list.txt" --per-entry 1 "$DIR/m.eml" >/dev/null
    }
    if [[ $MODE == backlog ]]; then
        enqueue
        before=$(calls)
        redis0=$(ticks "$REDIS_PID")
    fi
    NODE_PIDS=()
    for k in $(seq 1 "$K"); do
        $BIN node --redis "redis://127.0.0.1:$RPORT" --relay "${SINKS[$((k - 1))]}" \
            --consumer "n$k" --exit-when-idle 1 ${NODE_ARGS:-} >"$DIR/node.$k" 2>/dev/null &
        NODE_PIDS+=($!)
        PIDS+=($!)
    done
    cpu0=0
    if [[ $MODE == live ]]; then
        sleep 0.5
        for p in "${NODE_PIDS[@]}"; do cpu0=$((cpu0 + $(ticks "$p"))); done
        redis0=$(ticks "$REDIS_PID")
        before=$(calls)
        start_ms=$(R time | awk 'NR == 1 {s = $1} NR == 2 {printf "%.0f\n", s * 1000 + $1 / 1000}')
        enqueue
    fi
    # A node may exit as soon as the work is done (--exit-when-idle counts from its last read):
    # its CPU is sampled while waiting, and the last sample counts if it is gone by then.
    declare -A LAST_TICKS=()
    sample() { for p in "${NODE_PIDS[@]}"; do t=$(ticks "$p" 2>/dev/null) && LAST_TICKS[$p]=$t; done; }
    for _ in $(seq 1 6000); do
        sample
        all_acked && break
        sleep 0.02
    done
    sample
    cpu1=0
    for p in "${NODE_PIDS[@]}"; do cpu1=$((cpu1 + ${LAST_TICKS[$p]:-0})); done
    redis1=$(ticks "$REDIS_PID")
    after=$(calls)
    for p in "${NODE_PIDS[@]}"; do wait "$p"; done
    trips=$(cat "$DIR"/node.* | sed -n 's/.*round_trips=\([0-9]*\).*/\1/p' | awk '{s+=$1} END {print s}')
    if [[ $MODE == backlog ]]; then
        start_ms=$(cat "$DIR"/node.* | sed -n 's/.*first_read_at_ms=\([1-9][0-9]*\).*/\1/p' | sort -n | head -1)
    fi
    R --raw xrange '{mxpipe}:outcomes' - + | python3 -c '
import sys, json
lines = sys.stdin.read().split("\n")
last = None; n = 0
for i, line in enumerate(lines):
    if line.startswith("["):
        last = int(lines[i - 2].split("-")[0])
        n += sum(1 for o in json.loads(line) if o["status"] == "delivered")
mode, k, start, cpu, rcpu, before, after, trips, hz = sys.argv[1:]
span = max(last - int(start), 1) / 1000
print(f"mode={mode} nodes={k} delivered={n} msgs_per_s={n / span:.0f} cpu_us_per_msg={int(cpu) / int(hz) * 1e6 / n:.1f} "
      f"redis_cpu_us_per_msg={int(rcpu) / int(hz) * 1e6 / n:.1f} "
      f"redis_commands_per_msg={(int(after) - int(before)) / n:.4f} round_trips_per_msg={int(trips) / n:.4f}")
' "$MODE" "$K" "$start_ms" "$((cpu1 - cpu0))" "$((redis1 - redis0))" "$before" "$after" "$trips" "$HZ"
    rm -f "$DIR"/node.*
done
