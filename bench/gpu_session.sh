#!/usr/bin/env bash
# The one prepared run for a lent GPU: the CUDA tests, then the GPU check, each under a timeout so
# that one that hangs leaves the other its time; logs and JSON under $OUT. About 9 minutes on an
# H100/H200 (an estimate: 3 to 4 for the tests, which compile a dozen small graphs, and 5 for the
# check with the reduced steps below; at most 11 by the timeouts), so that it fits a 15-minute device
# lease with the machine's start.
#
#     bash bench/gpu_session.sh                    # OUT defaults to out/gpu_session
#
# The recipe side-by-side needs prepared text; where ../shared is not beside the checkout (a device
# machine), prepare it here and carry it along (10 MB):
#     python prepare_owt.py --source ../shared/data/webtext --max-tokens 5000000 --name owt_5m
# The smoke-pipeline test needs ../shared/data and the datasets package; without them it is skipped.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"
[ -d ../shared/tiktoken ] && export TIKTOKEN_CACHE_DIR="$(cd ../shared/tiktoken && pwd)"

set -o pipefail
timeout 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
echo "test_cuda exit $?" | tee -a "$OUT/test_cuda.log"

data=data/owt_5m
[ -f "$data/train.bin" ] || data=data/none  # gpu_check says it skips the side-by-side
timeout 360 $PY bench/gpu_check.py --steps 30 --resume-steps 8 --recipe-steps 30 --recipe-eval-windows 50 \
    --data-dir "$data" --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
echo "gpu_check exit $?" | tee -a "$OUT/gpu_check.log"
