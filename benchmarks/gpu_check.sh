#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with one CUDA GPU, from the repository root:
# installs the package over the machine's own CUDA torch (no torch download), then runs the check
# under 8 minutes. Results: $OUT/gpu_check.json (or ./gpu_check.json) and a table on stdout.
#   bash benchmarks/gpu_check.sh [--methods supervised semi_agcl ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pip install --quiet --no-deps -e . 2>/dev/null || true
python -m pip install --quiet "pyyaml" "jsonschema" "h5py" "pandas" "scipy" "medpy" "pooch" "tqdm" "Pillow" 2>/dev/null || true
exec timeout 470 python benchmarks/gpu_check.py --out "${OUT:-.}" "$@"
