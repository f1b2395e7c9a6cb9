#!/usr/bin/env bash
# apt-install.sh PACKAGE WHAT FALLBACK: install a Debian package when apt-get is there and we may run it
# as root; otherwise (or when the install fails) print one note saying what to do, and never fail.
#   PACKAGE   the Debian package          WHAT      what it is for (used in the messages)
#   FALLBACK  what normlab does / what to do without it
set -u
pkg=$1 what=$2 fallback=$3
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here to install $pkg ($what); $fallback" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: cannot run apt-get as root; install it yourself: sudo apt-get install $pkg" >&2
  exit 0
fi
echo "installing $pkg ($what) ..." >&2
$sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq "$pkg" >/dev/null \
  || echo "warning: apt-get install $pkg failed; $fallback" >&2
exit 0
