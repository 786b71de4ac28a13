#!/usr/bin/env bash
# The patched runtime on a CUDA machine, in one go (a lent GPU: see cpp_patch/README.md "Measured"):
#   1. build llama-bench, llama-perplexity and test-backend-ops with CUDA from a patched llama.cpp tree
#   2. test-backend-ops: the MUL_MAT_ID cases with masked ids, CUDA against the CPU
#   3. exactness of the grouped dispatch, llama-perplexity --kl-divergence on bench/dispatch_speed.py's models:
#      grouped (same Q4_K bytes; experts numbered group by group, and interleaved so that the kernels
#      read the map) against uniform, and the single grouped node against the per-group
#      composition (GEMQ_GGUF_SPLIT_GROUPS=1) on the mixed files (Q2_K/Q4_K/Q6_K, Q3_K/Q4_K/Q6_K), for
#      the MMQ (-ub 256), the one-token mmvq (-ub 1) and the small-batch mmvq (-ub 4) paths
#   4. bench/dispatch_speed.py --split: pp512/tg128 of uniform / grouped / mixed, single node and per-group nodes
#   5. where Nsight Compute (ncu) runs: bench/kernel_times.py, the decode kernels' times per file
#
#   bench/cuda_check.sh SRC_DIR [OUT_DIR]     (SRC_DIR: llama.cpp with cpp_patch/patches applied)
set -uo pipefail
SRC=${1:?usage: bench/cuda_check.sh SRC_DIR [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gemq-cuda-check}}  # summary.txt and logs.tgz (every log) end up here
BUILD=${BUILD:-/tmp/gemq-cuda-build}
MODELS=${MODELS:-/tmp/gemq-cuda-models}
mkdir -p "$OUT_DIR" "$MODELS"
SUMMARY=$OUT_DIR/summary.txt
LOGS=$(mktemp -d)
trap 'tar -czf "$OUT_DIR/logs.tgz" -C "$LOGS" .' EXIT
log() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
log "build"
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90-real}" -DGGML_CUDA_FA="${GGML_CUDA_FA:-OFF}" \
    -DGGML_CUDA_NCCL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF > "$LOGS/cmake.log" 2>&1 || { tail -30 "$LOGS/cmake.log"; exit 1; }
ninja -C "$BUILD" -j"$(nproc)" llama-bench llama-perplexity test-backend-ops > "$LOGS/build.log" 2>&1 \
    || { grep -B2 -A12 "error" "$LOGS/build.log" | head -60; exit 1; }
B=$BUILD/bin

log "test-backend-ops MUL_MAT_ID masked=1 (CUDA0 vs CPU)"
"$B/test-backend-ops" -o MUL_MAT_ID -b CUDA0 -p masked=1 > "$LOGS/test-backend-ops.txt" 2>&1
grep -E "tests passed|Backend CUDA0|FAIL" "$LOGS/test-backend-ops.txt" | head -20 | tee -a "$SUMMARY"

log "models"
export PYTHONPATH="$SRC/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
for order in group-major interleaved; do
    python3 bench/dispatch_speed.py --gen-only --expert-order $order --out "$MODELS" --bin-dir "$B" --lib-dir "$B" \
        >> "$SUMMARY" 2>&1 || exit 1
done
GI=$MODELS/dispatch-grouped-L8-interleaved.gguf
U=$MODELS/dispatch-uniform-L8.gguf
TEXT=/tmp/gemq-kld.txt
head -c 6000 gemq_gguf/data/eval/prose.txt > "$TEXT"  # byte-fallback tokens: ~1 token a character

ppl() { # log model ub base [args...]: llama-perplexity over $TEXT, writing (or, with --kl-divergence, reading) base
    local log=$1 model=$2 ub=$3 base=$4; shift 4
    "$B/llama-perplexity" -m "$model" -f "$TEXT" -c 256 --chunks 4 -b 256 -ub "$ub" -ngl 99 \
        --kl-divergence-base "$base" "$@" > "$LOGS/$log.txt" 2>&1
}
kld() { # name base model ub
    ppl "kld-$1" "$3" "$4" "$2" --kl-divergence
    echo "$1: $(grep -E "Mean +KLD|Maximum KLD|Same top" "$LOGS/kld-$1.txt" | tr -s ' ' | tr '\n' ';')" | tee -a "$SUMMARY"
}
log "exactness (llama-perplexity --kl-divergence, 4 chunks of 256)"
for ub in 256 1 4; do
    ppl "base-u-$ub" "$U" "$ub" "/tmp/base-u-$ub.kld"
    kld "grouped-vs-uniform-ub$ub" "/tmp/base-u-$ub.kld" "$MODELS/dispatch-grouped-L8.gguf" "$ub"
    kld "grouped-interleaved-vs-uniform-ub$ub" "/tmp/base-u-$ub.kld" "$GI" "$ub"
    for m in mixed mixed3; do
        GEMQ_GGUF_SPLIT_GROUPS=1 ppl "base-$m-$ub" "$MODELS/dispatch-$m-L8.gguf" "$ub" "/tmp/base-$m-$ub.kld"
        kld "$m-node-vs-split-ub$ub" "/tmp/base-$m-$ub.kld" "$MODELS/dispatch-$m-L8.gguf" "$ub"
    done
done

log "speed"
python3 bench/dispatch_speed.py --out "$MODELS" --bin-dir "$B" --lib-dir "$B" --ngl 99 --reps "${REPS:-10}" --split \
    --json "$LOGS/speed.json" 2>&1 | tee -a "$SUMMARY"
NCU=${NCU:-$(command -v ncu || true)}
if [ -n "$NCU" ]; then
    log "decode kernel times (ncu)"
    python3 bench/kernel_times.py --ncu "$NCU" --bin-dir "$B" "$U" "$MODELS"/dispatch-{grouped,mixed,mixed3}-L8.gguf "$GI" \
        2>&1 | tee -a "$SUMMARY"
fi
log "done"
