#!/usr/bin/env bash
# Builds tandem with `--features cuda` using nothing but package registries: the CUDA toolkit
# pieces come from NVIDIA's wheels on PyPI, in a virtual environment; no system CUDA install,
# no download from elsewhere. It builds on a machine without a GPU or driver too: the link
# step then uses a generated stub libcuda.so (soname libcuda.so.1, as the toolkit's own stubs),
# and the binary loads the real driver library where it runs. (The image build is
# deploy/docker/Dockerfile.cuda instead.)
#
# The toolkit version matters where the binary runs: candle ships its kernels as PTX, which the
# driver compiles at load time, and a driver only reads PTX from toolkits up to its own CUDA
# version. The default, 13.0, is what driver 580 (the lent H100/H200 machines) supports;
# TANDEM_CUDA_SERIES=13.4 (the newest cudarc 0.19 knows) for newer drivers.
#
# Usage:
#   scripts/build-cuda.sh                   toolchain, then cargo build (~30 min on 2 cores),
#                                           then target/cuda/tandem.xz for scripts/gpu-check.sh
#   scripts/build-cuda.sh --toolchain-only  toolchain and its checks, no cargo
# Environment:
#   CUDA_COMPUTE_CAP   target GPU (default 90: H100/H200; 80 A100, 89 L4/L40S)
#   TANDEM_CUDA_SERIES toolkit version (default 13.0; see above)
#   TANDEM_CUDA_VENV   where the venv goes (default ${XDG_CACHE_HOME:-~/.cache}/tandem/cuda-venv-SERIES)
#
# The binary is built in its own target dir, target/cuda/release/tandem, so that it never
# replaces the CPU build (target/release/tandem) that the tests run; it finds the CUDA
# libraries of the venv through its rpath, or elsewhere through LD_LIBRARY_PATH (on a machine
# with PyTorch's CUDA wheels, scripts/gpu-check.sh points it at theirs). `source <venv>/cuda-env.sh` sets up the same
# environment in a shell (for cargo test --features cuda, say).
set -euo pipefail
cd "$(dirname "$0")/.."

# cudarc 0.19 (candle 0.11's) knows CUDA up to 13.4 and reads the version from `nvcc --version`:
# a newer nvcc (13.5 is on PyPI) fails its build with "Unsupported cuda toolkit version".
CUDA_SERIES=${TANDEM_CUDA_SERIES:-13.0}
VENV=${TANDEM_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/cuda-venv-$CUDA_SERIES}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
toolchain_only=0
case "${1:-}" in
    --toolchain-only) toolchain_only=1 ;;
    "") ;;
    *)
        echo "usage: scripts/build-cuda.sh [--toolchain-only]" >&2
        exit 2
        ;;
esac
log() { echo "build-cuda: $*" >&2; }

# 1. The toolkit: nvcc and its C runtime headers and NVVM (compile candle's kernels to PTX),
#    CCCL (cub/thrust headers), and the libraries candle links dynamically (cudart, NVRTC,
#    cuBLAS/cuBLASLt, cuRAND) plus NCCL for the multi-GPU all-reduce.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==${CUDA_SERIES}.*" \
    "nvidia-cuda-crt==${CUDA_SERIES}.*" \
    "nvidia-cuda-runtime==${CUDA_SERIES}.*" \
    "nvidia-nvvm==${CUDA_SERIES}.*" \
    "nvidia-cuda-nvrtc==${CUDA_SERIES}.*" \
    "nvidia-cuda-cccl" \
    "nvidia-cublas>=13,<14" \
    "nvidia-curand>=10.4,<11" \
    "nvidia-nccl-cu13"

# 2. Where the wheels put it: site-packages/nvidia/cu13 is laid out as a CUDA root (bin/nvcc,
#    include/, include/cccl, lib/, nvvm/), NCCL apart in site-packages/nvidia/nccl.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA="$site/nvidia/cu13"
NCCL="$site/nvidia/nccl"
for f in "$CUDA/bin/nvcc" "$CUDA/nvvm/bin/cicc" "$CUDA/include/cuda_runtime.h" \
    "$CUDA/include/cccl/cub/cub.cuh" "$NCCL/lib/libnccl.so.2"; do
    [ -e "$f" ] || {
        log "expected $f after the pip install: has the wheels' layout changed?"
        exit 1
    }
done

# 3. The wheels ship only versioned libraries (libcublas.so.13); the linker wants the
#    unversioned names (-lcublas), as a CUDA install has them. libcuda is the driver's.
ln -sfn "$NCCL/lib/libnccl.so.2" "$CUDA/lib/libnccl.so.2"
for lib in "$CUDA"/lib/lib*.so.*; do
    base=$(basename "$lib")
    ln -sfn "$base" "$CUDA/lib/${base%%.so.*}.so"
done
mkdir -p "$CUDA/lib/stubs"
libcuda=$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 .*64/{print $NF; exit}')
if [ -n "$libcuda" ]; then
    ln -sfn "$libcuda" "$CUDA/lib/stubs/libcuda.so"
elif [ "$toolchain_only" = 0 ]; then
    # No driver here: link against a stub that defines every driver function cudarc declares
    # (never called: where the binary runs, the loader finds the driver's libcuda.so.1).
    log "no libcuda.so.1 (NVIDIA driver) here: linking against a generated stub"
    cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break')
    [ -f "$cudarc/src/driver/sys/mod.rs" ] || {
        log "cannot find cudarc's sources (cargo fetch first?)"
        exit 1
    }
    stub=$(mktemp -d)
    grep -o 'fn cu[A-Za-z0-9_]*(' "$cudarc/src/driver/sys/mod.rs" | sed 's/^fn //; s/($//' | sort -u |
        awk '{ print "int " $1 "(void) { return 999; }" }' >"$stub/libcuda.c"
    rm -f "$CUDA/lib/stubs/libcuda.so"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$stub/libcuda.c"
    rm -rf "$stub"
fi

export CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_HOME="$CUDA"
export PATH="$CUDA/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cat >"$VENV/cuda-env.sh" <<EOF
# Written by scripts/build-cuda.sh: the CUDA toolkit from PyPI wheels.
export CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_HOME="$CUDA"
export CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP
export PATH="$CUDA/bin:\$PATH"
export LD_LIBRARY_PATH="$CUDA/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
# The toolchain prepared last, at a fixed place (.ci/run sources it).
mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/tandem"
cp "$VENV/cuda-env.sh" "${XDG_CACHE_HOME:-$HOME/.cache}/tandem/cuda-env.sh"

# 4. Checks that fail in seconds rather than twenty minutes into the build.
nvcc --version | grep -q "release ${CUDA_SERIES}," || {
    nvcc --version >&2
    log "nvcc is not CUDA ${CUDA_SERIES}"
    exit 1
}
log "$(nvcc --version | grep release) at $CUDA, sm_${CUDA_COMPUTE_CAP}"
probe=$(mktemp -d)
cat >"$probe/probe.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cub/cub.cuh>
extern "C" __global__ void probe(__half *x) { x[threadIdx.x] = __hadd(x[threadIdx.x], x[0]); }
EOF
nvcc --ptx -arch="sm_${CUDA_COMPUTE_CAP}" -std=c++17 -o "$probe/probe.ptx" "$probe/probe.cu"
# tandem's own kernel (the dropout masks; NVRTC compiles the same source at run time).
nvcc --ptx -arch="sm_${CUDA_COMPUTE_CAP}" -o "$probe/dropout.ptx" src/model/dropout.cu
grep -q "tandem_dropout_mask" "$probe/dropout.ptx" || {
    log "src/model/dropout.cu compiled without its kernel entry point"
    exit 1
}
rm -rf "$probe"
log "nvcc compiles a kernel and tandem's dropout-mask kernel to PTX for sm_${CUDA_COMPUTE_CAP}"
if [ "$toolchain_only" = 1 ]; then
    log "toolchain ready (source $VENV/cuda-env.sh); skipping cargo build"
    exit 0
fi

# 5. The build, in its own target dir; the rpath lets the binary find the venv's libraries.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$CUDA/lib"
log "cargo build --release --features cuda (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --features cuda
log "built $CARGO_TARGET_DIR/release/tandem"

# 6. Compressed for the GPU machine (the working tree that travels there is capped at 64 MiB;
#    scripts/gpu-check.sh takes the .xz as it is).
xz -T0 -9 -c "$CARGO_TARGET_DIR/release/tandem" >"$CARGO_TARGET_DIR/tandem.xz"
raw=$(stat -c %s "$CARGO_TARGET_DIR/release/tandem")
packed=$(stat -c %s "$CARGO_TARGET_DIR/tandem.xz")
log "$CARGO_TARGET_DIR/tandem.xz: $((packed / 1048576)) MiB ($packed bytes; the binary $((raw / 1048576)) MiB)"
[ "$packed" -lt $((32 * 1048576)) ] || {
    log "the compressed binary is over 32 MiB"
    exit 1
}
