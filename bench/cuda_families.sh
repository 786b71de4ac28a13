#!/usr/bin/env bash
# CUDA exactness of grouped files for the newer MoE families (issue 14), on a lent GPU, in one go.
# Per family (tests/test_families.py's tiny checkpoints; bench/cuda_families_files.py makes the files):
#   split  vs uniform : the same Q4_K expert bytes split into 3 groups against the stock layout, CUDA,
#                       -ub 256 (MMQ) and -ub 1 (mmvq): should be identical (KLD at print resolution, 1e-6)
#   mixed  vs F32     : the truly mixed --budget file against its F32 GGUF, on CUDA (-ub 256, -ub 1) and on
#                       the CPU (-dev none): the KLDs should agree; the F32 base logits are made on the CPU by
#                       --prepare (an F32 GGUF per family would not fit the 64 MiB that travels)
#   node   vs split   : the mixed file's single grouped node against the per-group composition
#                       (GEMQ_GGUF_SPLIT_GROUPS=1), CUDA, -ub 256 and -ub 1
#
#   bench/cuda_families.sh --prepare FILES_DIR     (here, CPU: files, F32 bases, CPU KLDs of the mixed files)
#   bench/cuda_families.sh SRC_DIR FILES_DIR [OUT_DIR]   (GPU machine; SRC_DIR: patched llama.cpp tree)
# On the lent GPU (2026-12-03): FILES_DIR plus an xz tarball of the patched tree (~/.cache/gemq-gguf/src/...,
# pruned of docs/models/tests/examples and the other backends: 4 MB) in an ignored folder, named in `carry`;
# BUILD_S caps the build's seconds so that a timed-out call can be resumed. Results: docs/RESULTS.md.
set -uo pipefail
FAMILIES=${FAMILIES:-deepseek_v3 gpt_oss glm4_moe}
TEXT_ARGS=(-c 256 --chunks 4 -b 256)

if [ "${1:-}" = "--prepare" ]; then
    F=${2:?usage: bench/cuda_families.sh --prepare FILES_DIR}
    B=${BIN:-$HOME/.cache/gemq-gguf/llama.cpp/bin}
    mkdir -p "$F/models" "$F/base"
    head -c 6000 gemq_gguf/data/eval/prose.txt > "$F/text.txt"
    PYTHONPATH=$PWD python bench/cuda_families_files.py "$F/models" $FAMILIES || exit 1
    for fam in $FAMILIES; do
        "$B/llama-perplexity" -m "$F/models/$fam-f32.gguf" -f "$F/text.txt" "${TEXT_ARGS[@]}" -ngl 0 \
            --kl-divergence-base "$F/base/$fam-f32.kld" > "$F/base/$fam-f32.log" 2>&1 || exit 1
        "$B/llama-perplexity" -m "$F/models/$fam-mixed.gguf" -f "$F/text.txt" "${TEXT_ARGS[@]}" -ngl 0 \
            --kl-divergence-base "$F/base/$fam-f32.kld" --kl-divergence > "$F/base/$fam-mixed-cpu-here.log" 2>&1
        echo "$fam mixed-vs-f32 (CPU, here): $(grep -E "Mean +KLD|Maximum KLD|Same top" \
            "$F/base/$fam-mixed-cpu-here.log" | tr -s ' ' | tr '\n' ';')"
        rm "$F/models/$fam-f32.gguf"
        # uniform, split and mixed share their F32 non-expert bytes: xz's 32 MiB window stores them once
        tar -C "$F/models" -cf - "$fam-uniform.gguf" "$fam-split.gguf" "$fam-mixed.gguf" | xz -8 > "$F/$fam.tar.xz"
    done
    exit 0
fi

SRC=${1:?usage: bench/cuda_families.sh SRC_DIR FILES_DIR [OUT_DIR]}
F=${2:?usage: bench/cuda_families.sh SRC_DIR FILES_DIR [OUT_DIR]}
OUT_DIR=${3:-${OUT:-/tmp/gemq-cuda-families}}
BUILD=${BUILD:-/tmp/gemq-cuda-build}
MODELS=${MODELS:-/tmp/gemq-cuda-families-models}
mkdir -p "$OUT_DIR" "$MODELS"
SUMMARY=$OUT_DIR/summary.txt
LOGS=$(mktemp -d)
trap 'tar -czf "$OUT_DIR/logs.tgz" -C "$LOGS" .' EXIT  # $OUT brings back 8 files at most
log() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
if [ ! -f "$BUILD/build.ninja" ]; then
    log "cmake"
    cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90-real}" -DGGML_CUDA_FA="${GGML_CUDA_FA:-OFF}" \
        -DGGML_CUDA_NCCL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF > "$LOGS/cmake.log" 2>&1 || { tail -30 "$LOGS/cmake.log"; exit 1; }
fi
log "build llama-perplexity"  # resumable: a second call continues where a timed-out one stopped
timeout "${BUILD_S:-0}" ninja -C "$BUILD" -j"$(nproc)" llama-perplexity > "$LOGS/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then  # 124: BUILD_S ran out; the last line says how far it got
    grep -B2 -A12 " error" "$LOGS/build.log" | head -60; log "build stopped (rc $rc): $(tail -1 "$LOGS/build.log")"; exit 1
fi
log "built"
B=$BUILD/bin

ppl() { # log model ub base [args...]: llama-perplexity over the text, writing (or, with --kl-divergence, reading) base
    local log=$1 model=$2 ub=$3 base=$4; shift 4
    "$B/llama-perplexity" -m "$model" -f "$F/text.txt" "${TEXT_ARGS[@]}" -ub "$ub" -t "$(nproc)" \
        --kl-divergence-base "$base" "$@" > "$LOGS/$log.txt" 2>&1 || echo "$log: FAILED (rc $?)" | tee -a "$SUMMARY"
}
kld() { # name base model ub [args...]
    local name=$1 base=$2 model=$3 ub=$4; shift 4
    ppl "kld-$name" "$model" "$ub" "$base" --kl-divergence "$@"
    echo "$name: $(grep -E "Mean +KLD|Maximum KLD|Same top" "$LOGS/kld-$name.txt" | tr -s ' ' | tr '\n' ';')" | tee -a "$SUMMARY"
}
for fam in $FAMILIES; do
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$F/$fam.tar.xz" "$MODELS" || exit 1
    M=$MODELS/$fam
    log "$fam (llama-perplexity --kl-divergence, 4 chunks of 256)"
    for ub in 256 1; do
        ppl "$fam-base-uniform-$ub" "$M-uniform.gguf" "$ub" "/tmp/$fam-uniform-$ub.kld" -ngl 99
        kld "$fam-split-vs-uniform-cuda-ub$ub" "/tmp/$fam-uniform-$ub.kld" "$M-split.gguf" "$ub" -ngl 99
        kld "$fam-mixed-vs-f32-cuda-ub$ub" "$F/base/$fam-f32.kld" "$M-mixed.gguf" "$ub" -ngl 99
        GEMQ_GGUF_SPLIT_GROUPS=1 ppl "$fam-base-mixed-split-$ub" "$M-mixed.gguf" "$ub" "/tmp/$fam-mixed-split-$ub.kld" -ngl 99
        kld "$fam-mixed-node-vs-split-cuda-ub$ub" "/tmp/$fam-mixed-split-$ub.kld" "$M-mixed.gguf" "$ub" -ngl 99
    done
    kld "$fam-mixed-vs-f32-cpu-ub256" "$F/base/$fam-f32.kld" "$M-mixed.gguf" 256 -ngl 0 -dev none
    kld "$fam-split-vs-uniform-cpu-vs-cuda-ub256" "/tmp/$fam-uniform-256.kld" "$M-split.gguf" 256 -ngl 0 -dev none
done
log "done"
