#!/usr/bin/env bash
# No head-of-line blocking: a fast destination's throughput alone, and with a tarpit beside it.
#
#   bash benches/tarpit_neighbour.sh [MESSAGES] [TARPIT_MESSAGES] [ROUNDS]
#                                               (defaults: 500000 50000 3)
#   TARPIT_DELAY_MS=2000 CONNECTIONS=20         (the defaults)
#
# Starts two built-in sinks: a fast one on 127.0.0.2 and a tarpit on 127.0.0.3 that holds
# every reply TARPIT_DELAY_MS. Each round runs `mxpipe bench --to FAST` (alone) and the same
# with `--tarpit TARPIT --tarpit-messages N` (beside: N more messages go to the tarpit, spread
# over the submissions, and msgs_per_s counts only the fast destination's messages, timed until
# they are final), in turn first. It prints both figures and their ratio per round, then the median ratio,
# and exits 1 if that is below 0.90 (the goal: the fast destination keeps at least 90% of its
# throughput). Everything it starts is stopped by PID when it exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESSAGES=${1:-500000}
TARPIT_MESSAGES=${2:-50000}
ROUNDS=${3:-3}
TARPIT_DELAY_MS=${TARPIT_DELAY_MS:-2000}
CONNECTIONS=${CONNECTIONS:-20}
# shellcheck source=benches/common.sh
source benches/common.sh

# Port 0: each sink picks a free port and prints "mxpipe sink listening on ADDR".
"$BIN" sink --listen 127.0.0.2:0 >"$WORK/fast.log" 2>&1 &
PIDS+=($!)
"$BIN" sink --listen 127.0.0.3:0 --reply-delay-ms "$TARPIT_DELAY_MS" >"$WORK/tarpit.log" 2>&1 &
PIDS+=($!)
listening_on() {
    for _ in $(seq 100); do
        if grep -q "listening on" "$1" 2>/dev/null; then
            awk '/listening on/ { print $NF; exit }' "$1"
            return 0
        fi
        sleep 0.1
    done
    echo "sink did not start: $(cat "$1")" >&2
    return 1
}
FAST=$(listening_on "$WORK/fast.log")
TARPIT=$(listening_on "$WORK/tarpit.log")

alone() { "$BIN" bench --messages "$MESSAGES" --connections "$CONNECTIONS" --to "$FAST"; }
beside() {
    "$BIN" bench --messages "$MESSAGES" --connections "$CONNECTIONS" --to "$FAST" \
        --tarpit "$TARPIT" --tarpit-messages "$TARPIT_MESSAGES"
}
rate() { awk '/^result / { for (i = 1; i <= NF; i++) if ($i ~ /^msgs_per_s=/) { sub(/.*=/, "", $i); print $i } }'; }

echo "fast sink $FAST; tarpit $TARPIT (every reply held ${TARPIT_DELAY_MS} ms)"
echo "$MESSAGES messages to the fast sink; beside: $TARPIT_MESSAGES more to the tarpit"
RATIOS=()
for ((round = 1; round <= ROUNDS; round++)); do
    # Which run goes first alternates, so that neither always meets a cold or a warm machine.
    if ((round % 2)); then
        alone_out=$(alone)
        beside_out=$(beside)
    else
        beside_out=$(beside)
        alone_out=$(alone)
    fi
    alone=$(rate <<<"$alone_out")
    beside=$(rate <<<"$beside_out")
    tarpit_line=$(grep '^tarpit ' <<<"$beside_out")
    ratio=$(awk -v a="$alone" -v b="$beside" 'BEGIN { printf "%.3f", b / a }')
    RATIOS+=("$ratio")
    echo "round $round: alone msgs_per_s=$alone beside_tarpit msgs_per_s=$beside ratio=$ratio ($tarpit_line)"
done
median=$(printf '%s\n' "${RATIOS[@]}" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
if awk -v m="$median" 'BEGIN { exit !(m >= 0.90) }'; then
    echo "median ratio $median (goal >= 0.90: met)"
else
    echo "median ratio $median (goal >= 0.90: NOT met)"
    exit 1
fi
