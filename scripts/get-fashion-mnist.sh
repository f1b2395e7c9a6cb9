#!/usr/bin/env bash
# Install Debian's Fashion-MNIST (the four IDX files in /usr/share/datasets/fashion-mnist) when apt is there.
set -u
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
exec bash "$(dirname "$0")/apt-install.sh" dataset-fashion-mnist "Debian's Fashion-MNIST" \
  "pass --data-root to normlab, or let it download the data with torchvision"
