#!/bin/sh
# install_debian.sh COMMAND PACKAGE...: installs Debian's PACKAGEs when COMMAND (a name on PATH
# or an absolute path) is missing, and does nothing when it is there. The tests need two such
# programs: /usr/bin/chromium for the browser host (tests/test_web_host.py) and clang for
# tinygrad's CPU backend (tests/test_engine_conformance.py). Needs root (or sudo) and apt access
# to Debian's package archive.
set -eu
[ $# -ge 2 ] || { echo "usage: install_debian.sh COMMAND PACKAGE..." >&2; exit 2; }
cmd=$1
shift

if command -v "$cmd" >/dev/null 2>&1; then
    echo "$cmd: already installed"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_debian.sh: $cmd is missing and this is not root (no sudo either);" >&2
    echo "  install it with: apt-get install -y $*" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_debian.sh: no apt-get on this machine; install $* so that $cmd exists" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "$@"
command -v "$cmd" >/dev/null 2>&1 || { echo "install_debian.sh: $cmd still missing after installing $*" >&2; exit 1; }
echo "$cmd: installed ($*)"
