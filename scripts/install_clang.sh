#!/bin/sh
# Installs Debian's clang for tinygrad's CPU backend (tests/test_engine_conformance.py compiles
# its kernels with it), only when clang is missing. Needs root (or sudo) and apt access to
# Debian's package archive; does nothing when clang is already on PATH.
set -eu

if command -v clang >/dev/null 2>&1; then
    echo "clang: already installed ($(clang --version 2>/dev/null | head -n 1))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_clang.sh: clang is missing and this is not root (no sudo either);" >&2
    echo "  install it with: apt-get install -y clang" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_clang.sh: no apt-get on this machine; install clang so that it is on PATH" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends clang
echo "clang: $(clang --version 2>/dev/null | head -n 1)"
