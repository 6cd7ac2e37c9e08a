#!/usr/bin/env bash
# The C bindings' tests (`make test` runs this after building): the examples run against real
# SMTP servers, Postfix's smtp-sink, started here on free loopback ports and killed by PID.
#
#   accepting sink:  smtp-sink -u nobody 127.0.0.1:PORT 1024
#   rejecting sink:  smtp-sink -u nobody -f rcpt ...   (every RCPT gets 500 5.3.0)
#   slow sink:       smtp-sink -u nobody -w 2 ...      (answers DATA after 2 seconds)
#
# Every check runs even after one fails; the last line is "N passed, M failed".
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${BUILD:?set by the Makefile}
PKG_BIN=${PKG_BIN:?set by the Makefile}
SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}
[[ -x $SINK ]] || { echo "run_tests.sh: $SINK is missing (Debian package postfix)" >&2; exit 1; }

sink_pids=()
stop_sinks() {
    local pid
    for pid in "${sink_pids[@]+"${sink_pids[@]}"}"; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
}
SPOOLS=$(mktemp -d)
trap 'stop_sinks; rm -rf "$SPOOLS"' EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_sink VAR [smtp-sink flags...]: starts a sink, waits until it accepts, sets VAR=host:port.
start_sink() {
    local var=$1
    shift
    local port user=()
    port=$(free_port)
    [[ $(id -u) -eq 0 ]] && user=(-u nobody)
    "$SINK" "${user[@]}" "$@" "127.0.0.1:$port" 1024 &
    sink_pids+=($!)
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf -v "$var" '127.0.0.1:%s' "$port"
            return 0
        fi
        sleep 0.05
    done
    echo "run_tests.sh: smtp-sink did not start on port $port" >&2
    exit 1
}

start_sink ACCEPT
start_sink REJECT -f rcpt
start_sink SLOW -w 2
CLOSED=127.0.0.1:$(free_port) # nothing listens there: recipients are deferred
echo "smtp-sink accepting on $ACCEPT, rejecting RCPT on $REJECT, answering DATA after 2 s on $SLOW" \
    "(pids ${sink_pids[*]})"

passed=0
failed=0
# check NAME EXPECTED_STATUS PATTERN COMMAND...: runs COMMAND, wants its exit status and a line
# of its output matching PATTERN (an extended regular expression; "" for any).
check() {
    local name=$1 want=$2 pattern=$3
    shift 3
    local out status
    out=$("$@" 2>&1)
    status=$?
    if [[ $status -eq $want ]] && { [[ -z $pattern ]] || grep -Eq -- "$pattern" <<<"$out"; }; then
        passed=$((passed + 1))
        printf 'ok   %s\n' "$name"
    else
        failed=$((failed + 1))
        printf 'FAIL %s (exit %s, wanted %s%s)\n' "$name" "$status" "$want" \
            "${pattern:+ and output matching /$pattern/}"
        sed 's/^/     | /' <<<"$out"
    fi
}

for link in shared static; do
    check "send_one ($link) is delivered, its tag echoed" 0 \
        "someone@example.org: delivered 250 2\.0\.0 .*\(message 1, tag 42, attempt 1, category none\)" \
        "$BUILD/$link/send_one" "$ACCEPT"
    check "bulk_threads ($link): 4 producers, every outcome counted" 0 \
        "all outcomes as expected" "$BUILD/$link/bulk_threads" "$ACCEPT" "$REJECT" 2500
    check "bad_input ($link): every bad input gets its code and message" 0 \
        "bad_input: [0-9]+ cases, 0 failed" "$BUILD/$link/bad_input" "$ACCEPT" "$SLOW"
    check "spool_sync ($link): sync and the durable watermark; a restart recovers the spool" 0 \
        "spool_sync: 0 failed" "$BUILD/$link/spool_sync" "$CLOSED" "$SPOOLS/$link"
done
# AddressSanitizer reports a use after free and exits non-zero; leaks are valgrind's job below.
check "lifetimes (ASan): free waits for the callback; shutdown and free wake waiters" 0 \
    "lifetimes: 0 failed" env ASAN_OPTIONS=detect_leaks=0 "$BUILD/asan/lifetimes" "$ACCEPT" "$CLOSED"
check "shutdown_deadline (ASan): a bounded shutdown reports what it left as deferred" 0 \
    "shutdown_deadline: 0 failed" env ASAN_OPTIONS=detect_leaks=0 "$BUILD/asan/shutdown_deadline" \
    "$ACCEPT" "$SLOW"
check "send_one to a rejecting relay bounces" 2 "bounced 500 5\.3\.0 \"Error: command failed\"" \
    "$BUILD/shared/send_one" "$REJECT"
check "send_one built with pkg-config --cflags --libs mxpipe" 0 "delivered 250" \
    "$PKG_BIN" "$ACCEPT"
check "make install into a temporary prefix; built with pkg-config only (shared and --static)" 0 \
    "install_test: ok" bash "$HERE/install_test.sh" "$ACCEPT"
check "send_one under valgrind memcheck: no errors, no leaks" 0 \
    "ERROR SUMMARY: 0 errors from 0 contexts" \
    valgrind --leak-check=full --errors-for-leak-kinds=definite,possible --error-exitcode=1 \
    --suppressions="$HERE/valgrind.supp" \
    "$BUILD/shared/send_one" "$ACCEPT"
check "bad_input under valgrind memcheck: no errors, no leaks" 0 \
    "ERROR SUMMARY: 0 errors from 0 contexts" \
    valgrind --leak-check=full --errors-for-leak-kinds=definite,possible --error-exitcode=1 \
    --suppressions="$HERE/valgrind.supp" \
    "$BUILD/shared/bad_input" "$ACCEPT" "$SLOW"

echo "C bindings: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
