#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (for instance a lent `device` machine).
#
#   1. `tandem bench step --preset base --device cuda:0`: ms/step, samples/s, achieved GFLOP/s
#      and MFU against the card's fp32 peak, then the same with `--precision bf16` (mixed
#      precision) against its dense bf16 tensor-core peak;
#   2. a short 1-GPU job (the bundled default, pre-training then fine-tuning) and the same job
#      on the CPU with the same seed: the pre-training loss of every step must agree to
#      GPU_CHECK_RTOL (cuBLAS and tandem's CPU kernels round differently). On the GPU the
#      worker sums gradients with NCCL (a communicator of one rank: the bootstrap, the
#      all-reduce on the device and its completion wait all run) and updates on the device;
#      the script checks the worker's log says so;
#   3. two workers sharing the GPU, against two CPU workers: same data split, same dropout
#      masks, so the loss must agree to the same tolerance. NCCL refuses two ranks on one GPU,
#      so these use `cluster.gpu_collective = "ring"` (gradients meet in the host ring; the
#      update still runs on the device). (Not against the 1-worker run: the data partitions
#      and the dropout seeds depend on the world size.)
#   4. the 1-GPU job again in bf16 mixed precision (`model.precision = "bf16"`) against the f32
#      run on the same device: its loss must agree to GPU_CHECK_BF16_RTOL.
#
# Usage: scripts/gpu-check.sh [TANDEM_BINARY]
#   TANDEM_BINARY    a `--features cuda` build (default target/cuda/release/tandem, built with
#                    scripts/build-cuda.sh when missing). It may come from another machine:
#                    build it where there is time (no GPU or driver needed) and copy it over;
#                    its CUDA libraries are then taken from PyTorch's wheels if installed
# Environment:
#   GPU_CHECK_DEVICE     device to test (default cuda:0; `cpu` is a dry run on a machine without
#                        a GPU: the "device" runs then use the composed candle ops and the
#                        on-device update a GPU runs, TANDEM_FUSED_KERNELS=0 and
#                        TANDEM_DEVICE_UPDATE=1, against the fused CPU kernels and the host
#                        update; NCCL is not exercised)
#   GPU_CHECK_STEPS      pre-training steps of the jobs (default 30)
#   GPU_CHECK_PRESET     bench step preset (default base)
#   GPU_CHECK_RTOL       loss agreement, relative (default 0.01)
#   GPU_CHECK_BF16_RTOL  loss agreement of the bf16 run with the f32 one (default 0.05)
#   GPU_PEAK_FP32_TFLOPS the card's dense fp32 peak, when the card is not in the table below
#   GPU_PEAK_BF16_TFLOPS the card's dense bf16 tensor-core peak, likewise
#   OUT                  if set, gpu-check.json is written there
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-target/cuda/release/tandem}
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
STEPS=${GPU_CHECK_STEPS:-30}
PRESET=${GPU_CHECK_PRESET:-base}
RTOL=${GPU_CHECK_RTOL:-0.01}
BF16_RTOL=${GPU_CHECK_BF16_RTOL:-0.05}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
log() { echo "gpu-check: $*" >&2; }

if [ ! -x "$BIN" ]; then
    [ "$BIN" = target/cuda/release/tandem ] || {
        log "no executable at $BIN"
        exit 2
    }
    log "building the CUDA binary (scripts/build-cuda.sh)"
    scripts/build-cuda.sh
fi

# The binary links CUDA's libraries (runtime, cuBLAS, NVRTC, cuRAND, NCCL) dynamically and
# finds them through the rpath of the machine it was built on. Elsewhere (a binary built with
# scripts/build-cuda.sh and carried to a GPU machine), use PyTorch's CUDA wheels if present.
if command -v ldd >/dev/null && ldd "$BIN" 2>/dev/null | grep -q 'not found'; then
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
    for d in "$site"/nvidia/*/lib; do
        [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
    if ldd "$BIN" | grep 'not found' >&2; then
        log "libraries of $BIN not found (above); set LD_LIBRARY_PATH to a CUDA 13 install"
        exit 2
    fi
    log "CUDA libraries from $site/nvidia"
fi

card=cpu
peak=""
peak16=""
if [ "$DEVICE" != cpu ]; then
    command -v nvidia-smi >/dev/null || {
        log "nvidia-smi not found: is this a GPU machine?"
        exit 2
    }
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
    # Dense fp32 (non-tensor-core) and dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's
    # data sheets (without sparsity).
    case "$card" in
        *H200* | *H100*SXM* | *"H100 80GB HBM3"*) peak=67 peak16=989 ;;
        *H100*PCIe* | *H100*) peak=51 peak16=756 ;;
        *A100*) peak=19.5 peak16=312 ;;
        *L40S*) peak=91.6 peak16=362 ;;
        *L4*) peak=30.3 peak16=121 ;;
        *A10*) peak=31.2 peak16=125 ;;
        *) peak="" peak16="" ;;
    esac
    peak=${GPU_PEAK_FP32_TFLOPS:-$peak}
    peak16=${GPU_PEAK_BF16_TFLOPS:-$peak16}
fi
log "device $DEVICE ($card), binary $BIN"

json_field() { # json_field KEY < one-line JSON object
    sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p"
}

# 1. Training steps of BERT-base, in f32 and in bf16 mixed precision.
mfu_of() { # mfu_of GFLOPS PEAK_TFLOPS
    if [ -n "$2" ]; then awk -v g="$1" -v p="$2" 'BEGIN { printf "%.4f", g / (p * 1000) }'; else echo null; fi
}
step=$("$BIN" bench step --preset "$PRESET" --device "$DEVICE" --batch 32 --seq 128 --steps 10 --warmup 3)
echo "$step"
ms=$(echo "$step" | json_field ms_per_step)
gflops=$(echo "$step" | json_field gflops)
mfu=$(mfu_of "$gflops" "$peak")
log "$PRESET b32 s128 f32: $ms ms/step, $gflops GFLOP/s, MFU (fp32 peak ${peak:-?} TFLOP/s) $mfu"
step16=$("$BIN" bench step --preset "$PRESET" --device "$DEVICE" --batch 32 --seq 128 --steps 10 --warmup 3 --precision bf16)
echo "$step16"
ms16=$(echo "$step16" | json_field ms_per_step)
gflops16=$(echo "$step16" | json_field gflops)
mfu16=$(mfu_of "$gflops16" "$peak16")
log "$PRESET b32 s128 bf16: $ms16 ms/step, $gflops16 GFLOP/s, MFU (bf16 peak ${peak16:-?} TFLOP/s) $mfu16"

# 2. and 3. The bundled job on the device, on the CPU, and with two workers on the device.
run_job() { # run_job NAME DEVICE WORKERS [PRECISION] [GPU_COLLECTIVE]
    local fused=1 device_update=0
    if [ "$DEVICE" = cpu ] && [ "${1#gpu}" != "$1" ]; then fused=0 device_update=1; fi
    TANDEM_FUSED_KERNELS=$fused TANDEM_DEVICE_UPDATE=$device_update "$BIN" launch configs/local.toml --workers "$3" --device "$2" --max-steps "$STEPS" \
        --set "model.precision=${4:-f32}" --set "cluster.gpu_collective=${5:-nccl}" \
        --state-dir "$WORK/$1" --no-progress >"$WORK/$1.log" 2>&1 || {
        tail -n 30 "$WORK/$1.log" >&2
        log "the $1 job failed"
        exit 1
    }
}
losses() { # losses NAME: "step loss" of stage 0, from metrics.jsonl (keys in sorted order)
    grep '"stage_index":0' "$WORK/$1/metrics.jsonl" |
        sed -n 's/.*"loss":\([-0-9.eE+]*\).*"step":\([0-9]*\).*/\2 \1/p'
}
max_rel() { # max_rel A B: largest relative loss difference over the steps both logged
    join <(losses "$1" | sort -k1,1) <(losses "$2" | sort -k1,1) |
        awk '{ d = ($2 - $3) / ($3 == 0 ? 1 : $3); if (d < 0) d = -d; if (d > m) m = d; n++ }
             END { if (n == 0) { print "none"; exit } printf "%.2e\n", m }'
}
run_job gpu1 "$DEVICE" 1
run_job cpu1 cpu 1
run_job gpu2 "$DEVICE" 2 f32 ring
run_job cpu2 cpu 2
run_job gpu1bf16 "$DEVICE" 1 bf16
vs_cpu=$(max_rel gpu1 cpu1)
vs_cpu2=$(max_rel gpu2 cpu2)
vs_f32=$(max_rel gpu1bf16 gpu1)
log "pre-training loss, 1 worker on $DEVICE vs the CPU: max relative difference $vs_cpu over $STEPS steps"
log "pre-training loss, 2 workers on $DEVICE vs 2 on the CPU: max relative difference $vs_cpu2"
log "pre-training loss, bf16 vs f32 on $DEVICE (1 worker): max relative difference $vs_f32"
within() { # within D TOL
    [ "$1" != none ] && awk -v d="$1" -v t="$2" 'BEGIN { exit !(d <= t) }'
}
ok=true
# On a GPU the 1-worker job must have gone through NCCL.
nccl=false
grep -q "NCCL communicator ready" "$WORK/gpu1.log" && nccl=true
if [ "$DEVICE" != cpu ] && [ "$nccl" != true ]; then
    log "the 1-GPU job did not use NCCL (no \"NCCL communicator ready\" in its log)"
    ok=false
fi
within "$vs_cpu" "$RTOL" || ok=false
within "$vs_cpu2" "$RTOL" || ok=false
within "$vs_f32" "$BF16_RTOL" || ok=false
grep -h "mean time per step" "$WORK"/gpu1.log "$WORK"/gpu2.log >&2 || true

result=$(printf '{"date":"%s","card":"%s","device":"%s","base_ms_per_step":%s,"base_gflops":%s,"peak_fp32_tflops":%s,"mfu_fp32":%s,"bf16_ms_per_step":%s,"bf16_gflops":%s,"peak_bf16_tflops":%s,"mfu_bf16":%s,"steps":%s,"loss_rel_diff_1_worker":"%s","loss_rel_diff_2_workers":"%s","loss_rel_diff_bf16":"%s","nccl":%s,"rtol":%s,"bf16_rtol":%s,"ok":%s}' \
    "$(date -u +%FT%TZ)" "$card" "$DEVICE" "$ms" "$gflops" "${peak:-null}" "$mfu" "$ms16" "$gflops16" "${peak16:-null}" "$mfu16" "$STEPS" "$vs_cpu" "$vs_cpu2" "$vs_f32" "$nccl" "$RTOL" "$BF16_RTOL" "$ok")
echo "$result"
if [ -n "${OUT:-}" ]; then
    echo "$result" >"$OUT/gpu-check.json"
fi
$ok || {
    log "FAILED: losses differ by more than $RTOL (bf16 against f32: $BF16_RTOL)"
    exit 1
}
log "passed"
