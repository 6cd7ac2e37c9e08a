#!/usr/bin/env bash
# The spool's kill -9 test at full size, for the numbers in a report:
#   bash benches/spool_crash.sh [RECIPIENTS] [ROUNDS]     (default 100000 and 100)
# Each round sends one message to RECIPIENTS recipients through `mxpipe send --spool` to
# Postfix's smtp-sink, kills it with SIGKILL at random moments (once after the acknowledgement,
# then 0-3 restarts killed during recovery or sending), lets the last restart finish, and counts
# per recipient how often it arrived. Prints one line per round and a total.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MXPIPE_SPOOL_CRASH_RECIPIENTS=${1:-100000} MXPIPE_SPOOL_CRASH_ROUNDS=${2:-100} \
    cargo test --release --test spool_crash -- --nocapture
