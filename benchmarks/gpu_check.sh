#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with one CUDA GPU, from the repository root,
# under 8 minutes. It needs the package's dependencies beside a CUDA build of torch (where a
# registry is reachable: pip install -e .); the checkout itself is put on PYTHONPATH.
# Results: $OUT/gpu_check.json (or ./gpu_check.json) and a table on stdout.
#   bash benchmarks/gpu_check.sh [--methods supervised semi_agcl ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 python benchmarks/gpu_check.py --out "${OUT:-.}" "$@"
