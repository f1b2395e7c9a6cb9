#!/usr/bin/env bash
# Install Debian's Fashion-MNIST (the four IDX files in /usr/share/datasets/fashion-mnist) when apt is there.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here; normlab will look for Fashion-MNIST under --data-root or download it with torchvision" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: cannot run apt-get as root; install it yourself: sudo apt-get install dataset-fashion-mnist" >&2
  exit 0
fi
echo "installing Debian's dataset-fashion-mnist ..." >&2
$sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
  || echo "warning: apt-get install dataset-fashion-mnist failed; pass --data-root to normlab instead" >&2
exit 0
