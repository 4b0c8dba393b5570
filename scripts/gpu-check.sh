#!/usr/bin/env bash
# The GPU check: one command for a short slot on a machine with an NVIDIA GPU (a lent
# `device` machine: about 15 minutes including start-up, no package registry). It runs staged
# steps, cheapest and most informative first, each with its own timeout and its log in $OUT;
# a step that fails is recorded and the next one runs; a JSON summary is written at the end
# whatever happened (last line of stdout, and $OUT/gpu-check.json).
#
#   preflight        the binary (unpacked from .xz), the driver (nvidia-smi), its libraries
#                    (ldd; CUDA/NCCL from the installed PyTorch wheels when the rpath's are not
#                    there)
#   job_*            the bundled job (pre-training then fine-tuning), GPU_CHECK_STEPS steps, on
#                    the device and on the CPU with the same seed; the pre-training loss of
#                    every step must agree to GPU_CHECK_RTOL:
#                      job_nodrop_{gpu,cpu}   dropout off: the arithmetic alone
#                      job_{gpu,cpu}          dropout on: the device-made masks (Philox, one
#                                             kernel) must be the CPU's, bit for bit
#                      job_2w_{gpu,cpu}       two workers sharing the GPU through the ring
#                                             (NCCL refuses two ranks on one GPU)
#                      job_bf16_gpu           bf16 mixed precision against job_gpu
#                    On a GPU, job_gpu must have gone through NCCL (a communicator of one rank).
#   bench_*          `tandem bench step --preset GPU_CHECK_PRESET`: f32 and bf16 at batch 32
#                    and 128, and f32 on TF32 tensor cores: ms/step, GFLOP/s counted two ways
#                    (HF's, MLM decoder over every position; executed, masked positions only),
#                    MFU of each against the card's peak for the dtype, the phase split, and the
#                    GPU's peak memory while it ran.
#
# Usage: scripts/gpu-check.sh [TANDEM_BINARY[.xz]]
#   TANDEM_BINARY    a `--features cuda` build (default target/cuda/release/tandem); built on
#                    another machine with scripts/build-cuda.sh and carried here compressed
#                    (target/cuda/tandem.xz), it is unpacked first
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
#   GPU_CHECK_TIMEOUT_S  each step's limit (default 150; a bench step's is a third of it)
#   GPU_CHECK_BENCH_STEPS / GPU_CHECK_BENCH_WARMUP  timed and untimed steps of a bench (10, 3)
#   GPU_CHECK_FAIL_STEP  make the step of this name fail (to check that the rest still runs)
#   GPU_PEAK_FP32_TFLOPS / GPU_PEAK_BF16_TFLOPS / GPU_PEAK_TF32_TFLOPS
#                        the card's dense peaks, when it is not in the table below
#   OUT                  where the logs and gpu-check.json go (default: a temporary directory)
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-target/cuda/release/tandem}
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
STEPS=${GPU_CHECK_STEPS:-30}
PRESET=${GPU_CHECK_PRESET:-base}
RTOL=${GPU_CHECK_RTOL:-0.01}
BF16_RTOL=${GPU_CHECK_BF16_RTOL:-0.05}
LIMIT=${GPU_CHECK_TIMEOUT_S:-150}
BENCH_STEPS=${GPU_CHECK_BENCH_STEPS:-10}
BENCH_WARMUP=${GPU_CHECK_BENCH_WARMUP:-3}
WORK=$(mktemp -d)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
STEPS_FILE=$WORK/steps.tsv # name, status, seconds: one line per step run
: >"$STEPS_FILE"
log() { echo "gpu-check: $*" >&2; }

# The summary, whatever happened (also on an interrupt or an unexpected error).
summary() {
    python3 - "$OUT" "$STEPS_FILE" "$DEVICE" "$RTOL" "$BF16_RTOL" "$STEPS" "${CARD:-unknown}" \
        "${PEAK_FP32:-}" "${PEAK_BF16:-}" "${PEAK_TF32:-}" "$WORK" <<'PY'
import datetime, json, os, re, sys
out, steps_file, device, rtol, bf16_rtol, steps, card, p32, p16, ptf, work = sys.argv[1:]
steps_run = {}
for line in open(steps_file):
    name, status, secs = line.rstrip("\n").split("\t")
    steps_run[name] = {"status": status, "seconds": int(secs)}

def losses(name):
    """step -> loss of stage 0, from the job's metrics.jsonl."""
    p = os.path.join(work, name, "metrics.jsonl")
    if not os.path.exists(p):
        return {}
    rows = [json.loads(l) for l in open(p)]
    return {r["step"]: r["loss"] for r in rows if r.get("stage_index") == 0}

def max_rel(a, b):
    la, lb = losses(a), losses(b)
    common = sorted(set(la) & set(lb))
    if not common:
        return None
    return max(abs(la[s] - lb[s]) / (abs(lb[s]) or 1.0) for s in common)

def peak(x):
    return float(x) if x else None

checks = {}
for key, a, b, tol in [("loss_rel_diff_no_dropout", "job_nodrop_gpu", "job_nodrop_cpu", rtol),
                       ("loss_rel_diff_1_worker", "job_gpu", "job_cpu", rtol),
                       ("loss_rel_diff_2_workers", "job_2w_gpu", "job_2w_cpu", rtol),
                       ("loss_rel_diff_bf16", "job_bf16_gpu", "job_gpu", bf16_rtol)]:
    d = max_rel(a, b)
    checks[key] = {"value": d, "tolerance": float(tol), "ok": d is not None and d <= float(tol)}
gpu_log = os.path.join(out, "job_gpu.log")
nccl = os.path.exists(gpu_log) and "NCCL communicator ready" in open(gpu_log, errors="replace").read()
checks["nccl"] = {"value": nccl, "ok": nccl or device == "cpu"}

bench = {}
for name in sorted(n for n in steps_run if n.startswith("bench_")):
    p = os.path.join(out, name + ".log")
    lines = [l for l in open(p, errors="replace") if l.startswith("{")] if os.path.exists(p) else []
    if not lines:
        continue
    b = json.loads(lines[-1])
    pk = {"f32": peak(p32), "bf16": peak(p16), "tf32": peak(ptf)}[name.split("_")[1]]
    mem = os.path.join(out, name + ".gpumem")
    mib = [int(x) for x in open(mem).read().split() if x.isdigit()] if os.path.exists(mem) else []
    bench[name] = {k: b.get(k) for k in ["batch", "seq", "precision", "tf32", "ms_per_step",
                                         "samples_per_s", "gflops", "executed_gflops",
                                         "peak_rss_mib", "phases"]}
    bench[name]["peak_tflops"] = pk
    bench[name]["mfu_hf_flops"] = b["gflops"] / (pk * 1000) if pk else None
    bench[name]["mfu_executed_flops"] = b["executed_gflops"] / (pk * 1000) if pk else None
    bench[name]["peak_gpu_mib"] = max(mib) if mib else None

failed = [n for n, s in steps_run.items() if s["status"] != "ok"]
ok = not failed and all(c["ok"] for c in checks.values())
result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "card": card, "device": device, "steps": int(steps), "steps_run": steps_run,
          "failed_steps": failed, "checks": checks, "bench": bench, "ok": ok}
text = json.dumps(result, separators=(",", ":"))
open(os.path.join(out, "gpu-check.json"), "w").write(text + "\n")
print(text)
sys.exit(0 if ok else 1)
PY
}
# The summary, then the exit status: 1 unless every step ran and every check passed.
finish() {
    local passed=0
    summary || passed=1
    rm -rf "$WORK"
    exit $passed
}
trap finish EXIT

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, bounded by
# LIMIT_S; records ok, failed or timeout and goes on.
step() {
    local name=$1 limit=$2 t0 status=ok rc
    shift 2
    t0=$(date +%s)
    if [ "${GPU_CHECK_FAIL_STEP:-}" = "$name" ]; then
        echo "failing on purpose (GPU_CHECK_FAIL_STEP=$name)" >"$OUT/$name.log"
        status=failed
    else
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
        rc=$?
        case $rc in
            0) ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$STEPS_FILE"
    if [ "$status" = ok ]; then
        log "$name: ok ($(($(date +%s) - t0)) s)"
    else
        log "$name: $status; the last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" >&2
    fi
    [ "$status" = ok ]
}

# --- preflight: the binary, the driver, the libraries ------------------------------------------
preflight() {
    if [ "${BIN%.xz}" != "$BIN" ]; then
        xz -dc "$BIN" >"$WORK/tandem" && chmod +x "$WORK/tandem" || return 1
        echo "unpacked $BIN ($(stat -c %s "$BIN") bytes) to $(stat -c %s "$WORK/tandem") bytes"
        BIN=$WORK/tandem
    fi
    [ -x "$BIN" ] || {
        echo "no executable at $BIN (build it with scripts/build-cuda.sh)"
        return 1
    }
    if [ "$DEVICE" != cpu ]; then
        command -v nvidia-smi >/dev/null || {
            echo "nvidia-smi not found: is this a GPU machine?"
            return 1
        }
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
    # The binary links CUDA's libraries (runtime, cuBLAS, NVRTC, cuRAND, NCCL) dynamically and
    # finds them through the rpath of the machine it was built on; elsewhere, in PyTorch's
    # CUDA wheels when they are installed.
    if command -v ldd >/dev/null && ldd "$BIN" 2>/dev/null | grep -q 'not found'; then
        site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
        for d in "$site"/nvidia/*/lib "$site"/nvidia/cu*/lib; do
            [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        done
        export LD_LIBRARY_PATH
        echo "CUDA libraries from $site/nvidia"
    fi
    if command -v ldd >/dev/null && ldd "$BIN" | grep 'not found'; then
        echo "libraries of $BIN not found (above); set LD_LIBRARY_PATH to a CUDA 13 install"
        return 1
    fi
    "$BIN" --version
}
# Run here (not in `step`) so that BIN and LD_LIBRARY_PATH stay set for the steps after it.
t0=$(date +%s)
if [ "${GPU_CHECK_FAIL_STEP:-}" = preflight ]; then
    echo "failing on purpose (GPU_CHECK_FAIL_STEP=preflight)" >"$OUT/preflight.log"
    pre=failed
elif preflight >"$OUT/preflight.log" 2>&1; then
    pre=ok
else
    pre=failed
fi
printf 'preflight\t%s\t%s\n' "$pre" "$(($(date +%s) - t0))" >>"$STEPS_FILE"
log "preflight: $pre ($(cat "$OUT/preflight.log" | tail -n 1))"
[ "$pre" = ok ] || {
    tail -n 20 "$OUT/preflight.log" >&2
    exit 1
}

CARD=cpu
if [ "$DEVICE" != cpu ]; then
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
    # Dense peaks in TFLOP/s from NVIDIA's data sheets (without sparsity): fp32 (CUDA cores),
    # TF32 and bf16 tensor cores.
    case "$CARD" in
        *H200* | *H100*SXM* | *"H100 80GB HBM3"*) PEAK_FP32=67 PEAK_TF32=494 PEAK_BF16=989 ;;
        *H100*PCIe* | *H100*) PEAK_FP32=51 PEAK_TF32=378 PEAK_BF16=756 ;;
        *A100*) PEAK_FP32=19.5 PEAK_TF32=156 PEAK_BF16=312 ;;
        *L40S*) PEAK_FP32=91.6 PEAK_TF32=183 PEAK_BF16=362 ;;
        *L4*) PEAK_FP32=30.3 PEAK_TF32=60 PEAK_BF16=121 ;;
        *) PEAK_FP32="" PEAK_TF32="" PEAK_BF16="" ;;
    esac
    PEAK_FP32=${GPU_PEAK_FP32_TFLOPS:-$PEAK_FP32}
    PEAK_BF16=${GPU_PEAK_BF16_TFLOPS:-$PEAK_BF16}
    PEAK_TF32=${GPU_PEAK_TF32_TFLOPS:-$PEAK_TF32}
fi
log "device $DEVICE ($CARD), binary $BIN"

# --- the bundled job on the device and on the CPU ----------------------------------------------
# job NAME DEVICE WORKERS [--set KEY=VALUE …]: a "gpu" job on a CPU dry run takes the GPU's
# code path (composed ops, device update).
job() {
    local name=$1 device=$2 workers=$3 fused=1 device_update=0
    shift 3
    if [ "$DEVICE" = cpu ] && [ "${name%_gpu}" != "$name" ]; then fused=0 device_update=1; fi
    step "$name" "$LIMIT" env TANDEM_FUSED_KERNELS=$fused TANDEM_DEVICE_UPDATE=$device_update \
        "$BIN" launch configs/local.toml --workers "$workers" --device "$device" \
        --max-steps "$STEPS" --state-dir "$WORK/$name" --no-progress "$@"
}
job job_nodrop_gpu "$DEVICE" 1 --set model.dropout=0
job job_nodrop_cpu cpu 1 --set model.dropout=0
job job_gpu "$DEVICE" 1
job job_cpu cpu 1
job job_2w_gpu "$DEVICE" 2 --set cluster.gpu_collective=ring
job job_2w_cpu cpu 2
job job_bf16_gpu "$DEVICE" 1 --set model.precision=bf16
grep -h "mean time per step" "$OUT"/job_gpu.log "$OUT"/job_2w_gpu.log >&2 2>/dev/null || true

# --- training steps: ms/step, FLOP/s, MFU, phases, peak GPU memory ------------------------------
# bench NAME BATCH [FLAGS…]: one `bench step`, with the GPU's memory sampled while it runs.
bench() {
    local name=$1 batch=$2 sampler=""
    shift 2
    if [ "$DEVICE" != cpu ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
            >"$OUT/$name.gpumem" 2>/dev/null &
        sampler=$!
    fi
    step "$name" $((LIMIT / 3)) "$BIN" bench step --preset "$PRESET" --device "$DEVICE" \
        --batch "$batch" --seq 128 --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" "$@"
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    return 0
}
bench bench_f32_b32 32
bench bench_bf16_b32 32 --precision bf16
bench bench_tf32_b32 32 --tf32
bench bench_f32_b128 128
bench bench_bf16_b128 128 --precision bf16
exit 0
