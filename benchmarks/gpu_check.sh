#!/usr/bin/env bash
# The whole GPU check in one run (a few minutes) on a CUDA machine where nothing can be downloaded:
#   1. installs what it lacks from wheels in .whl/ (gguf, platformdirs: pip download them beside the repo),
#   2. makes its models with make_synthetic.py: SmolLM2's shape (Q4_1 layers, Q8_0 embedding/output) and
#      TinyLlama's 1.1B (Q4_0), since real files are too big to bring,
#   3. runs the torch backend's tests on CUDA (PURELM_TEST_DEVICE=cuda),
#   4. sweeps the packed product kernels' configurations on the 1.1B's shapes for 1-16 rows and a prompt's
#      512 (benchmarks/gpu_kernels.py, SWEEP_S seconds at most, 0: none;
#      its best per shape is the table the benchmarks then use: copy it to
#      purelm/backends/torch_backend/configs/<GPU name>.json to ship it),
#   5. profiles a decode step and a prompt of 512 tokens (gpu_kernels.py --no-sweep), then (once the
#      llama.cpp build below is done, so that its load on the CPU is not in the timings) runs
#      benchmarks/gpu_bench.py on both models (the GPU's copy bandwidth measured in the same run),
#      llama-bench, and bench.py --engines torch,
#   6. where .lcpp/llama-cpp-src.tar.xz holds a trimmed copy of llama.cpp's sources (made here by
#      benchmarks/trim_llama_cpp.sh), builds llama.cpp with CUDA for sm_90 in the background from the start
#      (FlashAttention kernels left out: GGML_CUDA_FA=OFF, the build's longest part) and, if it is done
#      in time (LLAMA_WAIT seconds into the script), runs `llama-bench -ngl 99` on the same two files.
# Results go to $OUT (default /tmp/purelm-gpu-check): tests.log, gpu_kernels.json, table.json,
# gpu_bench.json, gpu_profile.json, bench_torch.json, llama_build.log, llama_bench.json, gpu_bench_again.json.
#     bash benchmarks/gpu_check.sh      (with the device tool: carry .whl and .lcpp, OUT=$OUT)
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
LLAMA=/tmp/llama.cpp-cuda
if [ -f .lcpp/llama-cpp-src.tar.xz ] && command -v nvcc >/dev/null; then
    echo "== building llama.cpp with CUDA in the background"
    mkdir -p "$LLAMA" && tar -xJf .lcpp/llama-cpp-src.tar.xz -C "$LLAMA"
    ( cd "$LLAMA" && nice -n 19 cmake -S llama.cpp -B build $(command -v ninja >/dev/null && echo -G Ninja) \
        -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        && nice -n 19 cmake --build build -j "$(nproc)" --target llama-bench; echo "build rc $? at $SECONDS s" ) \
        >"$OUT/llama_build.log" 2>&1 &
    LLAMA_PID=$!
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

SMOL=$MODELS/smollm2-shape-q4_1.gguf
BIG=$MODELS/tinyllama-synth-q4_0.gguf
echo "== making models ($SECONDS s)"
MAKE_PIDS=""
if [ ! -f "$SMOL" ]; then
    $PY benchmarks/make_synthetic.py "$SMOL" --hidden 576 --layers 30 --ffn 1536 --heads 9 --kv-heads 3 \
        --vocab 49152 --ctx 2048 --type Q4_1 --embd-type Q8_0 --output-type Q8_0 --no-verify --quiet \
        >"$MODELS/make_smol.json" &
    MAKE_PIDS="$!"
fi
if [ ! -f "$BIG" ]; then
    $PY benchmarks/make_synthetic.py "$BIG" --no-verify --quiet >"$MODELS/make_big.json" &
    MAKE_PIDS="$MAKE_PIDS $!"
fi

echo "== torch backend tests on CUDA ($SECONDS s)"
PURELM_TEST_DEVICE=cuda timeout 300 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider \
    $($PY -c "import xdist" 2>/dev/null && echo "-n $(nproc)") tests/test_torch_backend.py 2>&1 | tee "$OUT/tests.log" | tail -15
echo "passes that could not be captured (warnings 'CUDA graphs are off'): $(grep -c 'CUDA graphs are off' "$OUT/tests.log")"
[ "${SWEEP_S:-300}" -gt 0 ] && echo "== kernel sweep ($SECONDS s)" && timeout "${SWEEP_S:-300}" $PY benchmarks/gpu_kernels.py --jobs "$(nproc)" --rows 1,512,16,8,4,2 --out "$OUT/gpu_kernels.json" --table "$OUT/table.json" \
    2>&1 | grep -v -i warn | tail -30
[ -s "$OUT/table.json" ] && export PURELM_TRITON_CONFIGS="$OUT/table.json"
[ -n "$MAKE_PIDS" ] && wait $MAKE_PIDS
timeout 90 $PY benchmarks/gpu_kernels.py --no-sweep "$BIG" "$SMOL" --out "$OUT/gpu_profile.json" 2>&1 \
    | grep -v -i warn | tail -40
if [ -n "${LLAMA_PID:-}" ]; then  # the timings below without the build's load on the CPU
    echo "== waiting for the llama.cpp build until ${LLAMA_WAIT:-480} s ($SECONDS s)"
    while kill -0 "$LLAMA_PID" 2>/dev/null && [ "$SECONDS" -lt "${LLAMA_WAIT:-480}" ]; do sleep 2; done
    tail -2 "$OUT/llama_build.log"
fi
echo "== gpu_bench ($SECONDS s)"
timeout 300 $PY benchmarks/gpu_bench.py "$SMOL" "$BIG" --out "$OUT/gpu_bench.json" >/dev/null
if [ -x "$LLAMA/build/bin/llama-bench" ]; then
    echo "== llama-bench -ngl 99 ($SECONDS s)"
    timeout 90 "$LLAMA/build/bin/llama-bench" -m "$SMOL" -m "$BIG" -ngl 99 -fa 0 -p 512 -n 128 -r 3 -o json \
        >"$OUT/llama_bench.json" 2>>"$OUT/llama_build.log"
    $PY -c "import json,sys; [print(r['model_filename'].split('/')[-1], r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) for r in json.load(open(sys.argv[1]))]" "$OUT/llama_bench.json"
    echo "== gpu_bench again, after llama-bench (engines alternating) ($SECONDS s)"
    timeout 120 $PY benchmarks/gpu_bench.py "$BIG" "$SMOL" --batch 1 --out "$OUT/gpu_bench_again.json" >/dev/null
elif [ -n "${LLAMA_PID:-}" ]; then
    echo "llama-bench not built in time"; grep -c "Building" "$OUT/llama_build.log"
fi
if [ "$SECONDS" -lt "${BENCH_BEFORE:-420}" ]; then
    echo "== bench.py --engines torch ($SECONDS s)"
    timeout 120 $PY benchmarks/bench.py "$SMOL" --engines torch --threads 1 --reps 3 --no-bandwidth \
        --out "$OUT/bench_torch.json" 2>&1 | tail -8
fi
echo "== done in $SECONDS s"
