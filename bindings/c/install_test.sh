#!/usr/bin/env bash
# Installs libmxpipe into a temporary prefix (`make install PREFIX=...`), moves the prefix
# elsewhere (the .pc file must be relocatable), and builds and runs send_one.c from what an
# installed package offers and nothing else: the header, the libraries and pkg-config.
# run_tests.sh runs it:  bash install_test.sh RELAY
#
# Checks: the files and symlinks; the SONAME libmxpipe.so.0; only mxp_* symbols exported; no
# rpath and no build-tree path anywhere; the header compiles as C89 and as C++; a program built
# with `pkg-config --cflags --libs mxpipe` needs libmxpipe.so.0 and delivers; one built with
# `cc -static ... pkg-config --static ...` contains the archive (needs no libmxpipe) and delivers.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RELAY=${1:?usage: install_test.sh RELAY}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$HERE/../../Cargo.toml" | head -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
    echo "install_test: $*" >&2
    exit 1
}

make -s -C "$HERE" install PREFIX="$work/staged" >/dev/null
mv "$work/staged" "$work/prefix" # relocated: nothing may point at the old place
prefix=$work/prefix
for f in include/mxpipe.h "lib/libmxpipe.so.$VERSION" lib/libmxpipe.a lib/pkgconfig/mxpipe.pc; do
    [[ -f $prefix/$f ]] || fail "$f is missing"
done
[[ $(readlink "$prefix/lib/libmxpipe.so.0") == "libmxpipe.so.$VERSION" ]] ||
    fail "libmxpipe.so.0 does not point to libmxpipe.so.$VERSION"
[[ $(readlink "$prefix/lib/libmxpipe.so") == libmxpipe.so.0 ]] ||
    fail "libmxpipe.so does not point to libmxpipe.so.0"
echo "installed: $(cd "$prefix" && find . -path ./lib/libmxpipe.a -prune -o -type f -print -o -type l -print | sort | tr '\n' ' ')"

dynamic=$(readelf -d "$prefix/lib/libmxpipe.so.0")
grep -q 'Library soname: \[libmxpipe.so.0\]' <<<"$dynamic" || fail "SONAME is not libmxpipe.so.0"
! grep -Eq 'RPATH|RUNPATH' <<<"$dynamic" || fail "the library has an rpath"
exported=$(nm -D --defined-only "$prefix/lib/libmxpipe.so.0" | awk '{print $3}' | sed 's/@.*//')
others=$(grep -v '^mxp_' <<<"$exported" || true)
[[ -z $others ]] || fail "exports other than mxp_*: $(tr '\n' ' ' <<<"$others")"
echo "SONAME libmxpipe.so.0; $(wc -l <<<"$exported") symbols exported, all mxp_*"

export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
pc=$(pkg-config --cflags --libs --static mxpipe)
! grep -q rpath <<<"$pc" || fail "pkg-config gives an rpath: $pc"
! grep -qF "$HERE" <<<"$pc$(cat "$prefix/lib/pkgconfig/mxpipe.pc")" || fail "a build-tree path in mxpipe.pc"
[[ $(pkg-config --modversion mxpipe) == "$VERSION" ]] || fail "pkg-config --modversion"

# The header alone, as C89 and as C++.
# Included twice: the include guard holds in both languages.
printf '#include <mxpipe.h>\n#include <mxpipe.h>\nint main(void) { return mxp_version() == 0; }\n' >"$work/header.c"
# shellcheck disable=SC2046
cc -std=c89 -Wall -Werror -fsyntax-only $(pkg-config --cflags mxpipe) "$work/header.c" ||
    fail "the header does not compile as C89"
# shellcheck disable=SC2046
c++ -x c++ -std=c++11 -Wall -Werror -fsyntax-only $(pkg-config --cflags mxpipe) "$work/header.c" ||
    fail "the header does not compile as C++"
echo "the header compiles as C89 and as C++"

# util.h is the example's own helper, next to it; everything of mxpipe's comes from pkg-config.
cp "$HERE/examples/send_one.c" "$HERE/examples/util.h" "$work/"
# shellcheck disable=SC2046
cc -O2 -o "$work/send_one" "$work/send_one.c" $(pkg-config --cflags --libs mxpipe)
# (Whole outputs go to grep: with pipefail, grep -q ending a pipe early would fail it.)
grep -q 'Shared library: \[libmxpipe.so.0\]' <<<"$(readelf -d "$work/send_one")" ||
    fail "send_one (shared) does not need libmxpipe.so.0"
LD_LIBRARY_PATH=$prefix/lib "$work/send_one" "$RELAY" | grep -E 'delivered 250' ||
    fail "send_one (shared, installed) was not delivered"

# shellcheck disable=SC2046
cc -O2 -static -o "$work/send_one_static" "$work/send_one.c" \
    $(pkg-config --static --cflags --libs mxpipe) 2>"$work/static.log" ||
    { cat "$work/static.log" >&2; fail "the static link failed"; }
! grep -q 'libmxpipe' <<<"$(readelf -d "$work/send_one_static" 2>/dev/null)" ||
    fail "send_one (static) still needs libmxpipe.so"
grep -q ' T mxp_dispatcher_new$' <<<"$(nm "$work/send_one_static")" ||
    fail "send_one (static) does not contain the archive"
"$work/send_one_static" "$RELAY" | grep -E 'delivered 250' ||
    fail "send_one (static, installed) was not delivered"
echo "install_test: ok"
