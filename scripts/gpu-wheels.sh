#!/usr/bin/env bash
# Wheels of normlab's pure-Python dependencies that a GPU image without network lacks, into .whl/
# (in .gitignore): the device machine installs them with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The image already has torch, torchvision, rich, torchmetrics, matplotlib, tensorboard, pyyaml, numpy,
# pillow, scipy, scikit-learn, tqdm and opencv-python-headless (bench/archive/NOTES.md); grad-cam and ttach are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
for spec in grad-cam==1.5.7 ttach==0.0.3; do
  # binary first (as the device README asks); grad-cam ships only a source archive: build its pure-Python wheel
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec" 2>/dev/null \
    || $PY -m pip wheel -q --no-deps -w .whl "$spec"
done
ls -l .whl
