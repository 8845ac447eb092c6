#!/usr/bin/env bash
# The whole GPU check in one run (a few minutes) on a CUDA machine where nothing can be downloaded:
#   1. installs what it lacks from wheels in .whl/ (gguf, platformdirs: pip download them beside the repo),
#   2. makes its models with make_synthetic.py: SmolLM2's shape (Q4_1 layers, Q8_0 embedding/output) and
#      TinyLlama's 1.1B (Q4_0), since real files are too big to bring,
#   3. runs the torch backend's tests on CUDA (PURELM_TEST_DEVICE=cuda),
#   4. sweeps the packed product kernels' configurations on the 1.1B's shapes (benchmarks/gpu_kernels.py;
#      its best per shape is the table the benchmarks then use: copy it to
#      purelm/backends/torch_backend/configs/<GPU name>.json to ship it),
#   5. runs benchmarks/gpu_bench.py on both models (the GPU's copy bandwidth measured in the same run),
#      a decode step's kernels by device time (gpu_kernels.py), and bench.py --engines torch.
# Results go to $OUT (default /tmp/purelm-gpu-check): tests.log, gpu_kernels.json, table.json,
# gpu_bench.json, gpu_profile.json, bench_torch.json.
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/purelm-gpu-check}
MODELS=${MODELS:-/tmp/purelm-models}
mkdir -p "$OUT" "$MODELS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/purelm-site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/purelm-site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

SMOL=$MODELS/smollm2-shape-q4_1.gguf
BIG=$MODELS/tinyllama-synth-q4_0.gguf
echo "== making models ($SECONDS s)"
[ -f "$SMOL" ] || $PY benchmarks/make_synthetic.py "$SMOL" --hidden 576 --layers 30 --ffn 1536 --heads 9 \
    --kv-heads 3 --vocab 49152 --ctx 2048 --type Q4_1 --embd-type Q8_0 --output-type Q8_0 --no-verify --quiet \
    >"$OUT/make_smol.json" &
[ -f "$BIG" ] || $PY benchmarks/make_synthetic.py "$BIG" --no-verify --quiet >"$OUT/make_big.json" &

echo "== torch backend tests on CUDA ($SECONDS s)"
PURELM_TEST_DEVICE=cuda timeout 300 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider \
    $($PY -c "import xdist" 2>/dev/null && echo "-n $(nproc)") tests/test_torch_backend.py 2>&1 | tee "$OUT/tests.log" | tail -15
echo "== kernel sweep ($SECONDS s)"
timeout 150 $PY benchmarks/gpu_kernels.py --jobs "$(nproc)" --out "$OUT/gpu_kernels.json" --table "$OUT/table.json" \
    2>&1 | grep -v -i warn | tail -14
[ -s "$OUT/table.json" ] && export PURELM_TRITON_CONFIGS="$OUT/table.json"
wait
echo "== gpu_bench ($SECONDS s)"
timeout 300 $PY benchmarks/gpu_bench.py "$SMOL" "$BIG" --out "$OUT/gpu_bench.json" >/dev/null
timeout 60 $PY benchmarks/gpu_kernels.py --no-sweep "$BIG" "$SMOL" --out "$OUT/gpu_profile.json" 2>&1 \
    | grep -v -i warn | tail -30
if [ "$SECONDS" -lt 420 ]; then
    echo "== bench.py --engines torch ($SECONDS s)"
    timeout 120 $PY benchmarks/bench.py "$SMOL" --engines torch --threads 1 --reps 3 --no-bandwidth \
        --out "$OUT/bench_torch.json" 2>&1 | tail -8
fi
echo "== done in $SECONDS s"
