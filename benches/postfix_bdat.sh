#!/usr/bin/env bash
# Pipelined BDAT against a real Postfix smtpd (issue 18): 2 KB single-recipient messages to a
# private Postfix (CHUNKING + PIPELINING) that discards them, an older mxpipe and this one
# alternately, with the CPU that Postfix (every process of the instance) and mxpipe spent.
#
#   OLD=/path/to/old/mxpipe [NEW=/path/to/new/mxpipe] [RTT_MS=5] bash benches/postfix_bdat.sh [MESSAGES] [RUNS] [CONNECTIONS]
#
# RTT_MS (default 0: the client talks to smtpd directly) puts examples/delay_relay.rs in front of
# smtpd: each direction is forwarded RTT_MS / 2 milliseconds after it arrived, so every round
# trip costs about RTT_MS, as to a remote MX (this kernel has no netem). The relay uses only std
# and is compiled with rustc alone (a cargo build of the example would rebuild the library with
# the dev-dependencies' features). Its own CPU is printed apart (relay_cpu_us_per_msg) and
# counted in neither figure.
#
# Without OLD only the new build runs; without NEW the new build is this tree's. Needs root and Debian's postfix (tests/run.sh installs it).
# The instance's queue lives in /dev/shm, so that its fsyncs cost nothing: what is measured is
# smtpd, cleanup and the discard transport, not the disk. Prints one line per run:
#   run build=old|new rtt_ms=N msgs_per_s=N client_cpu_us_per_msg=F postfix_cpu_us_per_msg=F relay_cpu_us_per_msg=F loadavg=F
# (loadavg: the 1-minute load average when the run ended; the machine may be shared.)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh
MESSAGES=${1:-20000}
RUNS=${2:-5}
CONNECTIONS=${3:-20}
OLD=${OLD:-}
RTT_MS=${RTT_MS:-0}
BIN=${NEW:-$BIN}
[[ $(id -u) == 0 ]] || { echo "postfix_bdat.sh: needs root (Postfix's master)" >&2; exit 1; }

DIR=$(mktemp -d /dev/shm/mxpipe-postfix.XXXXXX)
chmod 755 "$DIR"
mkdir -p "$DIR/queue" "$DIR/data"
chown postfix "$DIR/data"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$DIR/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $DIR/queue
data_directory = $DIR/data
mail_owner = postfix
maillog_file = $DIR/maillog
maillog_file_prefixes = $DIR
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
myhostname = mx.bench.test
mydestination =
relay_domains = sink.example
relay_transport = discard:
default_transport = discard:
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_peername_lookup = no
in_flow_delay = 0
default_process_limit = 200
EOF
# Debian's master.cf with smtpd on our port, no chroot.
awk -v svc="127.0.0.1:$PORT" '
    /^[a-z0-9]/ && NF >= 8 { if ($1 == "smtp" && $2 == "inet") $1 = svc; $5 = "n" }
    { print }' /etc/postfix/master.cf > "$DIR/master.cf"
/usr/sbin/postfix -c "$DIR" start >/dev/null 2>&1
stop_postfix() { /usr/sbin/postfix -c "$DIR" stop >/dev/null 2>&1 || true; sleep 1; rm -rf "$DIR"; cleanup; }
trap stop_postfix EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
TARGET=$PORT
RELAY=
if [[ $RTT_MS != 0 ]]; then
    TARGET=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rustc --edition 2021 -O -o "$WORK/delay_relay" examples/delay_relay.rs
    "$WORK/delay_relay" "$TARGET" "127.0.0.1:$PORT" "$RTT_MS" >"$WORK/relay.out" &
    RELAY=$!
    PIDS+=("$RELAY")
    for _ in $(seq 100); do
        grep -q ready "$WORK/relay.out" && break
        kill -0 "$RELAY" 2>/dev/null || break
        sleep 0.1
    done
    grep -q ready "$WORK/relay.out" || { echo "postfix_bdat.sh: the delay relay did not start (RTT_MS=$RTT_MS)" >&2; exit 1; }
fi
# CPU ticks (user + system) the relay spent so far; 0 without one.
relay_ticks() { if [[ -n $RELAY ]]; then awk '{print $14 + $15}' "/proc/$RELAY/stat"; else echo 0; fi; }

# CPU seconds (user + system, in clock ticks) of the instance: the master with the children it
# reaped, and every live child.
postfix_ticks() {
    local master
    master=$(head -1 "$DIR/queue/pid/master.pid" | tr -d ' ')
    {
        awk '{print $14 + $15 + $16 + $17}' "/proc/$master/stat"
        for p in $(pgrep -P "$master"); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true; done
    } | awk '{s += $1} END {print s}'
}
HZ=$(getconf CLK_TCK)

per_msg() { # ticks -> µs per message
    awk -v t="$1" -v hz="$HZ" -v n="$MESSAGES" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}'
}

run() { # build binary
    local before after line relay_before relay_after
    before=$(postfix_ticks)
    relay_before=$(relay_ticks)
    line=$("$2" bench --to "127.0.0.1:$TARGET" --messages "$MESSAGES" --size 2048 \
        --connections "$CONNECTIONS" | grep '^result')
    # Postfix finishes discarding after the last 250.
    sleep 2
    after=$(postfix_ticks)
    relay_after=$(relay_ticks)
    local mps cpu
    mps=$(sed -n 's/.*msgs_per_s=\([0-9.]*\).*/\1/p' <<<"$line")
    cpu=$(sed -n 's/.*cpu_us_per_msg=\([0-9.]*\).*/\1/p' <<<"$line")
    echo "run build=$1 rtt_ms=$RTT_MS msgs_per_s=$mps client_cpu_us_per_msg=$cpu postfix_cpu_us_per_msg=$(
        per_msg $((after - before))
    ) relay_cpu_us_per_msg=$(per_msg $((relay_after - relay_before))) loadavg=$(cut -d' ' -f1 /proc/loadavg)"
}

# A warm-up run: smtpd processes started, queue files made once.
run warmup "$BIN" >/dev/null
for _ in $(seq "$RUNS"); do
    [[ -n $OLD ]] && run old "$OLD"
    run new "$BIN"
done
