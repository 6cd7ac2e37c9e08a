#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this): bash tests/run.sh
#
# 1. Installs what the tests need when it is missing, and only then: Postfix's smtp-sink,
#    dnsmasq, valgrind, pkg-config, g++, sasl2-bin and libsasl2-modules (a private Postfix with
#    Cyrus SASL for the TLS tests) and redis-server from Debian; a venv at tests/.venv with
#    aiosmtpd, pytest, redis,
#    dkimpy, cryptography, pynacl and mypy from PyPI.
# 2. Runs every step, even after one fails: cargo test --all-targets, cargo test --doc, the
#    spool's fault-injection tests (--features failpoints), the C
#    bindings' `make test` and the Python bindings' pytest suite (each when present).
# 3. Ends with the line "N passed, M failed" counting those steps; exits non-zero if any failed.
#
# Each step runs in its own process group, which is killed when the step ends, so a server a
# test failed to stop does not outlive the run. Nothing is ever killed by name.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/tests/.venv"
PY="$VENV/bin/python"
PY_TEST_PACKAGES=(aiosmtpd pytest dkimpy cryptography pynacl mypy redis)
PY_TEST_IMPORTS="import aiosmtpd, pytest, dkim, cryptography, nacl, mypy, redis"

export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"
export MXPIPE_TEST_PYTHON="$PY"

say() { printf 'run.sh: %s\n' "$*" >&2; }
die() {
    say "setup failed: $*"
    exit 1
}

# Runs a command quietly; shows its output only if it fails.
quietly() {
    local log
    log=$(mktemp)
    if "$@" >"$log" 2>&1; then
        rm -f "$log"
    else
        local rc=$?
        cat "$log" >&2
        rm -f "$log"
        return "$rc"
    fi
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    else
        sudo -n "$@"
    fi
}

APT_UPDATED=0
apt_install() {
    if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
        die "need root (or sudo) to install: $*"
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        quietly as_root apt-get update || die "apt-get update"
        APT_UPDATED=1
    fi
    say "installing from Debian: $*"
    quietly as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@" || die "apt-get install $*"
}

# --- Debian packages -------------------------------------------------------------------------
missing=()
[[ -x /usr/sbin/smtp-sink ]] || missing+=(postfix)
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# A private Postfix with Cyrus SASL for the TLS/AUTH tests: saslpasswd2 and the sasldb plugin.
[[ -x /usr/sbin/saslpasswd2 ]] || missing+=(sasl2-bin)
compgen -G "/usr/lib/*/sasl2/libsasldb.so*" >/dev/null || missing+=(libsasl2-modules)
# The C bindings' install test compiles the header as C++ too.
command -v c++ >/dev/null 2>&1 || missing+=(g++)
# The scale-out tests (tests/cluster.rs) start their own redis-server instances.
[[ -x /usr/bin/redis-server && -x /usr/bin/redis-cli ]] || missing+=(redis-server)
if ((${#missing[@]})); then
    if [[ " ${missing[*]} " == *" postfix "* ]]; then
        # "No configuration": the package installs its tools and starts no mail daemon.
        echo "postfix postfix/main_mailer_type select No configuration" |
            as_root debconf-set-selections || die "debconf-set-selections"
    fi
    apt_install "${missing[@]}"
fi
[[ -x /usr/sbin/smtp-sink ]] || die "/usr/sbin/smtp-sink still missing after installing postfix"

# --- Python venv -----------------------------------------------------------------------------
if ! { [[ -x "$PY" ]] && "$PY" -c "import sys" >/dev/null 2>&1; }; then
    say "creating $VENV"
    if ! quietly python3 -m venv --clear "$VENV"; then
        # Debian's own python3 needs python3-venv for ensurepip.
        apt_install python3-venv
        quietly python3 -m venv --clear "$VENV" || die "python3 -m venv $VENV"
    fi
fi
if ! "$PY" -c "$PY_TEST_IMPORTS" >/dev/null 2>&1; then
    say "installing from PyPI into tests/.venv: ${PY_TEST_PACKAGES[*]}"
    quietly "$PY" -m pip install --disable-pip-version-check -q "${PY_TEST_PACKAGES[@]}" ||
        die "pip install ${PY_TEST_PACKAGES[*]}"
    "$PY" -c "$PY_TEST_IMPORTS" || die "test packages still not importable"
fi

# --- Steps -----------------------------------------------------------------------------------
passed=0
failed=0
failed_steps=()
STEP_PGID=""

cleanup_step_group() {
    local pgid=$1
    if command -v pgrep >/dev/null 2>&1 && pgrep -g "$pgid" >/dev/null 2>&1; then
        say "processes left running by the step, now killed:"
        ps -o pid=,args= -p "$(pgrep -d, -g "$pgid")" >&2 || true
    fi
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

on_signal() {
    [[ -n "$STEP_PGID" ]] && cleanup_step_group "$STEP_PGID"
    say "interrupted"
    exit 130
}
trap on_signal INT TERM

# run_step NAME COMMAND...: runs COMMAND as the leader of a new session and process group
# (setsid does not fork here: a background job of a non-interactive shell is no group leader).
run_step() {
    local name=$1
    shift
    printf '\n===== %s: %s\n' "$name" "$*"
    local rc=0
    setsid "$@" </dev/null &
    STEP_PGID=$!
    wait "$STEP_PGID" || rc=$?
    cleanup_step_group "$STEP_PGID"
    STEP_PGID=""
    if [[ $rc -eq 0 ]]; then
        passed=$((passed + 1))
        printf '===== %s: passed\n' "$name"
    else
        failed=$((failed + 1))
        failed_steps+=("$name (exit $rc)")
        printf '===== %s: FAILED (exit %s)\n' "$name" "$rc"
    fi
}

# Exported (with PY) so that `bash -c python_bindings` can run it as a step.
python_bindings() {
    "$PY" -m pip install --disable-pip-version-check -q ./bindings/python || return
    local rc=0
    "$PY" -m pytest -q bindings/python/tests || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "pytest collected no tests in bindings/python/tests" >&2
    fi
    return "$rc"
}
export PY
export -f python_bindings

run_step "cargo test" cargo test --all-targets --no-fail-fast
run_step "doc tests" cargo test --doc
# The spool's injected faults (fsync EIO, ENOSPC on write) need the failpoints feature.
run_step "spool faults" cargo test --features failpoints --lib spool
if [[ -f bindings/c/Makefile ]]; then
    run_step "C bindings" make -C bindings/c test
fi
if [[ -f bindings/python/pyproject.toml ]]; then
    run_step "Python bindings" bash -c python_bindings
fi

echo
for step in "${failed_steps[@]+"${failed_steps[@]}"}"; do
    echo "failed step: $step"
done
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
