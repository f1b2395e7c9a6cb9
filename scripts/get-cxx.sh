#!/usr/bin/env bash
# Make sure a C++ compiler is there for normlab's CPU norm kernels (src/normlab/norms/_kernels.cpp,
# built on first use); install Debian's g++ when apt is there. Without one normlab still works, with
# slower tensor-op norms (and the kernel tests fail, saying so).
set -u
if command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || [ -n "${CXX:-}" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no C++ compiler and no apt-get: install g++ for normlab's fast CPU norm kernels" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: cannot run apt-get as root; install g++ yourself: sudo apt-get install g++" >&2
  exit 0
fi
echo "installing g++ (for normlab's CPU norm kernels) ..." >&2
$sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq g++ >/dev/null \
  || echo "warning: apt-get install g++ failed; normlab will use its slower tensor-op norms" >&2
exit 0
