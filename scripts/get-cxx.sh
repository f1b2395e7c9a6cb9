#!/usr/bin/env bash
# Make sure a C++ compiler is there for normlab's CPU norm kernels (src/normlab/norms/_kernels.cpp,
# built on first use); install Debian's g++ when apt is there. Without one normlab still works, with
# slower tensor-op norms (and the kernel tests fail, saying so).
set -u
if command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || [ -n "${CXX:-}" ]; then
  exit 0
fi
exec bash "$(dirname "$0")/apt-install.sh" g++ "the C++ compiler for normlab's CPU norm kernels" \
  "normlab will use its slower tensor-op norms"
