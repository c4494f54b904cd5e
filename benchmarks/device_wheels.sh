#!/usr/bin/env bash
# Makes the wheel folder benchmarks/device_check.sh installs from on an air-gapped GPU node: the pure-Python
# packages trustcnn needs beyond what such a node has (PyTorch, torchvision, pytorch-lightning, torchmetrics,
# numpy, scipy, scikit-learn, matplotlib, pillow, pytest, cloudpickle). Run it where pip reaches a package
# index, in the repository root, then carry the folder to the node:
#
#   bash benchmarks/device_wheels.sh [DIR]        # default DIR: .whl (ignored by git via .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
# Pure-Python wheels (py3-none-any): any Python 3 and platform. antlr4-python3-runtime 4.9.3 (what
# omegaconf 2.3 pins) is published as a source archive only, so it is built into a wheel here.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    "hydra-core==1.3.8" "omegaconf==2.3.1" "submitit==1.5.4" "hydra-submitit-launcher==1.2.0"
python3 -m pip wheel -q --no-deps -w "$DIR" "antlr4-python3-runtime==4.9.3"
grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
ls -1 "$DIR"
