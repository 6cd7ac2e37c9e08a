#!/usr/bin/env bash
# The spool against memory (README "Benchmarks"):
#   bash benches/spool_vs_memory.sh RUNS -- [mxpipe bench options]
# Runs `mxpipe bench` RUNS times in memory and spooled, alternating, each spooled run on a fresh
# spool directory under SPOOL_VS_MEMORY_DIR (default /var/tmp: a real disk, not tmpfs), and
# prints each pair and the median of recipients per second spooled over in memory. Needs a
# release build (cargo build --release) or MXPIPE_BIN.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${1:?usage: spool_vs_memory.sh RUNS -- [bench options]}
shift
[[ ${1:-} == -- ]] && shift
BIN=${MXPIPE_BIN:-target/release/mxpipe}
SPOOL=$(mktemp -d -p "${SPOOL_VS_MEMORY_DIR:-/var/tmp}" mxpipe-spool-vs-memory.XXXXXX)
trap 'rm -rf "$SPOOL"' EXIT
rate() { sed -n 's/.* recipients_per_s=\([0-9.]*\).*/\1/p' <<<"$1"; }
ratios=()
for i in $(seq 1 "$RUNS"); do
    rm -rf "$SPOOL/s"
    memory=$("$BIN" bench "$@" | grep -E '^(loop|result)' | tr '\n' ' ')
    spooled=$("$BIN" bench "$@" --spool "$SPOOL/s" | grep -E '^(spool|loop|result)' | tr '\n' ' ')
    ratio=$(python3 -c "print(f'{$(rate "$spooled") / $(rate "$memory"):.3f}')")
    ratios+=("$ratio")
    echo "pair $i memory: $memory"
    echo "pair $i spooled: $spooled"
    echo "pair $i ratio=$ratio load=$(cut -d' ' -f1 /proc/loadavg)"
done
python3 -c 'import statistics, sys; r = sorted(map(float, sys.argv[1:])); print("ratios", r, "median", statistics.median(r))' "${ratios[@]}"
