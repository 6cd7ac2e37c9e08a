#!/usr/bin/env bash
# Direct-to-MX throughput against the same load through a single smarthost.
#
#   bash benches/mx_throughput.sh [MESSAGES] [DOMAINS]      (defaults: 100000 10000)
#   UNIQUE_MX=1 bash benches/mx_throughput.sh 1000000 100000  (every domain its own MX host:
#                                                             as many destinations as domains)
#
# Starts four built-in sinks on 127.0.0.2-5 (one port), a dnsmasq on 127.0.0.1 that gives each
# of DOMAINS domains (d0.bench.test ...) an MX on one of those four hosts, then runs
# `mxpipe bench --direct-mx` over all domains and `mxpipe bench --to` one sink, and prints both
# result lines. Everything it starts is stopped by PID when it exits. Needs dnsmasq
# (Debian dnsmasq-base); run as root (dnsmasq --user=root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESSAGES=${1:-100000}
DOMAINS=${2:-10000}
export PATH="/usr/sbin:$PATH"
command -v dnsmasq >/dev/null || { echo "dnsmasq missing (apt-get install dnsmasq-base)" >&2; exit 1; }
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

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.2", 0)); print(s.getsockname()[1])'
}
PORT=$(free_port)
DNS_PORT=$(free_port)

for k in 2 3 4 5; do
    "$BIN" sink --listen "127.0.0.$k:$PORT" >"$WORK/sink$k.log" 2>&1 &
    PIDS+=($!)
done

CONF="$WORK/dnsmasq.conf"
{
    for k in 2 3 4 5; do echo "host-record=mx$k.bench.test,127.0.0.$k"; done
    if [[ ${UNIQUE_MX:-0} == 1 ]]; then
        for ((n = 0; n < DOMAINS; n++)); do
            echo "mx-host=d$n.bench.test,mx-d$n.bench.test,10"
            echo "host-record=mx-d$n.bench.test,127.0.0.$((2 + n % 4))"
        done
    else
        for ((n = 0; n < DOMAINS; n++)); do echo "mx-host=d$n.bench.test,mx$((2 + n % 4)).bench.test,10"; done
    fi
    echo "local-ttl=600"
} >"$CONF"
dnsmasq --keep-in-foreground --conf-file="$CONF" --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --port="$DNS_PORT" --local=/test/ --user=root \
    >"$WORK/dnsmasq.log" 2>&1 &
PIDS+=($!)

# Wait until every sink and the DNS server answer (bounded).
for _ in $(seq 100); do
    ready=1
    for k in 2 3 4 5; do
        grep -q "listening" "$WORK/sink$k.log" 2>/dev/null || ready=0
    done
    [[ $ready -eq 1 ]] && break
    sleep 0.1
done
sleep 0.3

echo "direct MX, $MESSAGES messages over $DOMAINS domains on 4 MX hosts:"
${PERF:-} "$BIN" bench --messages "$MESSAGES" --connections "${CONNECTIONS:-20}" --direct-mx \
    --nameserver "127.0.0.1:$DNS_PORT" --mx-port "$PORT" --domains "$DOMAINS"
echo "one smarthost, $MESSAGES messages:"
"$BIN" bench --messages "$MESSAGES" --connections 20 --to "127.0.0.2:$PORT"
