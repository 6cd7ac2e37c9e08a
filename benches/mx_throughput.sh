#!/usr/bin/env bash
# Direct-to-MX throughput against the same load through a single smarthost.
#
#   bash benches/mx_throughput.sh [MESSAGES] [DOMAINS]      (defaults: 100000 10000)
#   UNIQUE_MX=1 bash benches/mx_throughput.sh 1000000 100000  (every domain its own MX host:
#                                                             as many destinations as domains)
#   CONNECTIONS=N   connections per destination in the MX run (default 20)
#   PERF="perf stat" a command prefix for the MX run
#
# Starts one built-in sink serving 127.0.0.2-5 (one port, one loop: the same server work as in
# the smarthost run, so that the ratio measures the client) and NSD, an authoritative DNS
# server, on 127.0.0.1 with a zone giving each of DOMAINS domains (d0.bench.test ...) an MX on
# one of those four addresses. It then runs `mxpipe bench --direct-mx` over all domains and
# `mxpipe bench --to` one address of the same sink, and prints both result lines. Everything it
# starts is stopped by PID when it exits.
#
# Needs NSD (Debian package nsd). dnsmasq, which the tests use, keeps its MX records in a list
# that it scans for every query: at 10,000 domains that costs it more CPU than the whole
# delivery, and at 100,000 it cannot keep up at all. NSD's response rate limiting is turned off:
# it exists to stop reflection attacks, and would otherwise drop most of the benchmark's answers
# (all NODATA answers of a zone share one budget of 200 a second).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESSAGES=${1:-100000}
DOMAINS=${2:-10000}
export PATH="/usr/sbin:$PATH"
command -v nsd >/dev/null || { echo "nsd missing (apt-get install nsd)" >&2; exit 1; }
# shellcheck source=benches/common.sh
source benches/common.sh

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.2", 0)); print(s.getsockname()[1])'
}
PORT=$(free_port)
DNS_PORT=$(free_port)

"$BIN" sink --listen "127.0.0.2:$PORT" --listen "127.0.0.3:$PORT" --listen "127.0.0.4:$PORT" \
    --listen "127.0.0.5:$PORT" >"$WORK/sink.log" 2>&1 &
PIDS+=($!)

{
    echo '$TTL 600'
    echo '@ SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 600'
    echo '@ NS ns.bench.test.'
    echo 'ns A 127.0.0.1'
    for k in 2 3 4 5; do echo "mx$k A 127.0.0.$k"; done
    if [[ ${UNIQUE_MX:-0} == 1 ]]; then
        for ((n = 0; n < DOMAINS; n++)); do
            echo "d$n MX 10 mx-d$n.bench.test."
            echo "mx-d$n A 127.0.0.$((2 + n % 4))"
        done
    else
        for ((n = 0; n < DOMAINS; n++)); do echo "d$n MX 10 mx$((2 + n % 4)).bench.test."; done
    fi
} >"$WORK/bench.test.zone"
printf '%s\n' \
    'server:' \
    '  rrl-ratelimit: 0' \
    '  rrl-whitelist-ratelimit: 0' \
    "  ip-address: 127.0.0.1@$DNS_PORT" \
    '  server-count: 1' \
    '  username: ""' \
    "  zonesdir: \"$WORK\"" \
    '  database: ""' \
    "  pidfile: \"$WORK/nsd.pid\"" \
    "  xfrdfile: \"$WORK/xfrd.state\"" \
    "  zonelistfile: \"$WORK/zone.list\"" \
    "  logfile: \"$WORK/nsd.log\"" \
    '  verbosity: 1' \
    'remote-control:' \
    '  control-enable: no' \
    'zone:' \
    '  name: "bench.test"' \
    '  zonefile: "bench.test.zone"' >"$WORK/nsd.conf"
nsd -d -c "$WORK/nsd.conf" &
PIDS+=($!)

# Wait until the sink listens and NSD has loaded the zone (bounded: 60 s).
for _ in $(seq 600); do
    if grep -q "listening" "$WORK/sink.log" 2>/dev/null &&
        grep -q "zone bench.test read" "$WORK/nsd.log" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
grep -q "zone bench.test read" "$WORK/nsd.log" 2>/dev/null ||
    { echo "nsd did not load the zone:" >&2; cat "$WORK/nsd.log" >&2; exit 1; }

echo "direct MX, $MESSAGES messages over $DOMAINS domains on 4 MX addresses:"
${PERF:-} "$BIN" bench --messages "$MESSAGES" --connections "${CONNECTIONS:-20}" --direct-mx \
    --nameserver "127.0.0.1:$DNS_PORT" --mx-port "$PORT" --mx-allow-loopback --domains "$DOMAINS"
echo "one smarthost, $MESSAGES messages:"
"$BIN" bench --messages "$MESSAGES" --connections 20 --to "127.0.0.2:$PORT"
