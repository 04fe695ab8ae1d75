#!/usr/bin/env bash
# One call on a lent GPU machine (see bench/README.md): install offline, GPU tests, the compile
# check for this GPU, the benchmarks, the report; after each step everything so far is packed into
# two archives, $OUT/session-logs.tgz and $OUT/session-results.tgz (nothing else is written to $OUT).
#
#     bash bench/gpu_session.sh            # the device tool's command; $OUT is set by it
#
# Budget: 8 minutes on an H200 (the device tool allows 15 per session, start-up included). Each
# step has its own time limit (seconds, overridable: STEP_TESTS=..., STEP_COMPILE=..., ...), the
# most important first; a step that runs out is cut and noted, and the rest still run.
# PYTHON=... picks the interpreter (default python3); SKIP_INSTALL=1 skips the offline install.
set -u
OUT=${OUT:-$PWD/gpu-session-out}
WORK=${WORK:-/tmp/fastsiglip-gpu-session}  # logs and results live here; only the archives go to $OUT
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
LOG=$WORK/logs/session.log
START=$(date +%s)
note() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
pack() {  # (re)write the two archives, so that a cut session still returns everything so far
    tar czf "$WORK/logs.tgz" -C "$WORK" logs 2>/dev/null && mv -f "$WORK/logs.tgz" "$OUT/session-logs.tgz"
    tar czf "$WORK/results.tgz" -C "$WORK" results 2>/dev/null && mv -f "$WORK/results.tgz" "$OUT/session-results.tgz"
}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to logs/NAME.log, then pack
    local name=$1 limit=$2; shift 2
    note "start $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    local rc=$?
    note "end $name: exit $rc$([ $rc -eq 124 ] && echo ' (time limit: cut)')"
    tail -n 3 "$WORK/logs/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    pack
    return 0
}
trap pack EXIT

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$WORK/logs/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    >>"$WORK/logs/gpu.txt" 2>&1
cat "$WORK/logs/gpu.txt" | tee -a "$LOG"

# 1. Install offline (no network there): the package itself, then any peer wheels carried in .whl/.
[ -n "${SKIP_INSTALL:-}" ] || step install 30 $PY -m pip install --no-deps --no-build-isolation -e .
if [ -z "${SKIP_INSTALL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    step peers 30 $PY -m pip install --no-deps --no-index .whl/*.whl
fi

# 2. The GPU tests (bf16, real sizes).
step gpu-tests "${STEP_TESTS:-90}" $PY -m pytest -m gpu -q -x -p no:cacheprovider tests

# 3. The ahead-of-time compile check for this GPU's generation (no cache: a fresh machine).
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(100 if c[0] >= 10 else 90)")
step compile-check "${STEP_COMPILE:-80}" env FASTSIGLIP_COMPILE_CACHE="$WORK/compile-cache" \
    $PY bench/compile_check.py --arch "$ARCH" --jobs "$(nproc)" --json "$WORK/results/compile_check-sm$ARCH.json"

# 4. The pytest-benchmark suite: one shape per family first (the README's), eager and peers
#    before torch.compile (whose compiles take longest); then the rest if time remains.
step bench-quick "${STEP_BENCH_QUICK:-85}" $PY -m pytest bench/ --benchmark-only --quick -q -p no:cacheprovider \
    -k "not torch.compile and not vlm" --benchmark-json "$WORK/results/kernels-quick.json"
step bench-compile "${STEP_BENCH_COMPILE:-30}" $PY -m pytest bench/ --benchmark-only --quick -q -p no:cacheprovider \
    -k "torch.compile" --benchmark-json "$WORK/results/kernels-compile.json"
# The warp-specialized attention forward (opt-in until this session shows it works): the same
# quick shapes with it offered to the autotuner, against bench-quick's fastsiglip rows.
step bench-ws "${STEP_WS:-15}" env FASTSIGLIP_WARP_SPECIALIZE=1 $PY -m pytest bench/ --benchmark-only --quick -q \
    -p no:cacheprovider -k "attention and fastsiglip and not bwd" --benchmark-json "$WORK/results/kernels-ws.json"

# 5. The scripts' floors and ratios (trimmed to fit; each writes its own results file).
step bench-loss "${STEP_LOSS:-35}" $PY bench/sigmoid_loss.py --dims 768 --batches 16384 65536 --chunks \
    --out-dir "$WORK/results"
step bench-e2e "${STEP_E2E:-30}" $PY bench/end_to_end.py --presets siglip2-base-patch16-224 --no-compile \
    --out-dir "$WORK/results"
# 6. The VLM towers (fastsiglip.patch against transformers' sdpa / flash-attn / Liger): PaliGemma 2's
#    So400m/14 at 224 and 896, SmolVLM's padded tiles; forward and forward + backward, bf16.
step bench-vlm "${STEP_VLM:-45}" $PY bench/vlm.py --towers so400m-224 so400m-896 smolvlm-512 --rep 10 \
    --out-dir "$WORK/results"
# 7. `fastsiglip embed` end to end: CPU decoding workers against nvjpeg (--decode gpu, needs torchvision).
step bench-embed "${STEP_EMBED:-25}" $PY bench/embed.py --preset siglip2-base-patch16-224 --device cuda \
    --images 1024 --batch-size 128 --workers 4 16 --decode exact gpu --json "$WORK/results/embed.json"

# 8. The report of what landed, printed (README.md is rebuilt where the results are committed).
mkdir -p bench/results
for f in "$WORK"/results/*.json "$WORK"/results/*.md; do
    [ -s "$f" ] && case $f in *compile_check*) ;; *) cp "$f" bench/results/ ;; esac
done
step report 10 $PY bench/report.py --print
cp "$WORK/logs/report.log" "$WORK/results/README-performance.md" 2>/dev/null
note "done in $(( $(date +%s) - START ))s"
