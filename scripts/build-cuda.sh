#!/usr/bin/env bash
# Builds the CUDA-enabled qtaylor binary on a machine without a GPU or a CUDA install
# (../shared/GPU.md's recipe as one command):
#   1. a pinned pip virtual environment with nvcc 13.0 and the CUDA libraries,
#   2. a link folder with unversioned links to them and a generated libcuda link stub
#      (the real driver library is used at run time),
#   3. cargo build --release --features cuda (kernels compiled for compute capability 90),
#   4. a stripped binary in dist/cuda/qtaylor (ignored by git).
# Rerunnable (each step is skipped when its result is there); fails loudly on any error.
# Usage: scripts/build-cuda.sh [--cudnn] [--nccl]     Env: CUDA_COMPUTE_CAP (default 90)
#   --cudnn  cuDNN convolutions (the fast path);
#   --nccl   NCCL all-reduce for data-parallel `train --devices cuda:0,cuda:1,...` (links
#            libnccl.so.2 2.28.9, the version PyTorch 2.11's cu13 wheels carry).
# Run on the GPU machine with:
#   LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:$LD_LIBRARY_PATH dist/cuda/qtaylor ...
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
features=cuda
for a in "$@"; do
  case $a in
    --cudnn) features+=,cudnn ;;
    --nccl) features+=,nccl ;;
    *) echo "usage: scripts/build-cuda.sh [--cudnn] [--nccl] (not $a)" >&2; exit 2 ;;
  esac
done
venv=$repo/target/cuda-venv
links=$repo/target/cuda-links
export CARGO_TARGET_DIR=$repo/target/cuda
pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85
      nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cublas==13.0.2.14
      nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
[[ $features == *cudnn* ]] && pkgs+=(nvidia-cudnn-cu13)
[[ $features == *nccl* ]] && pkgs+=(nvidia-nccl-cu13==2.28.9)

step() { echo "== $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  python3 -m venv "$venv"
fi
step "pip install ${pkgs[*]}"
"$venv/bin/pip" install --quiet "${pkgs[@]}"
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cu/bin/nvcc" ] || { echo "error: nvcc not found under $cu/bin" >&2; exit 1; }
"$cu/bin/nvcc" --version | tail -2 >&2

step "link folder $links"
mkdir -p "$links"
for lib in cublas cublasLt cudart curand nvrtc; do
  f=$(ls "$cu"/lib/lib$lib.so.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "error: lib$lib.so.* not found in $cu/lib" >&2; exit 1; }
  ln -sf "$f" "$links/lib$lib.so"
done
if [[ $features == *nccl* ]]; then
  d=$("$venv/bin/python" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
  ln -sf "$d/libnccl.so.2" "$links/libnccl.so"
fi
if [[ $features == *cudnn* ]]; then
  d=$("$venv/bin/python" -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))')
  for f in "$d"/libcudnn*.so.*; do
    b=$(basename "$f"); ln -sf "$f" "$links/${b%%.so.*}.so"
  done
fi

export PATH=$cu/bin:$PATH CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="-L $links"

# libcuda is the driver: a stub with the symbols the build needs, generated from the
# compiled cudarc/candle rlibs (a first build compiles them; its link step may fail).
if [ ! -f "$links/libcuda.so" ]; then
  step "first build (compiles the kernels, about 10 minutes on 2 cores)"
  cargo build --release --features "$features" || true
  step "libcuda stub"
  syms=$(for r in "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib "$CARGO_TARGET_DIR"/release/deps/libcandle_core-*.rlib; do
           nm -u "$r" 2>/dev/null; done | awk '{print $NF}' | grep -E '^cu[A-Z]' | sort -u)
  [ -n "$syms" ] || { echo "error: no cu* symbols found in the cudarc/candle rlibs" >&2; exit 1; }
  printf '%s\n' $syms | sed 's/.*/void &(void) {}/' > "$links/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c"
  echo "stub with $(printf '%s\n' $syms | wc -l) symbols" >&2
fi

step "cargo build --release --features $features"
cargo build --release --features "$features"
mkdir -p "$repo/dist/cuda"
strip -o "$repo/dist/cuda/qtaylor" "$CARGO_TARGET_DIR/release/qtaylor"
ls -la "$repo/dist/cuda/qtaylor"
echo "built dist/cuda/qtaylor ($features)" >&2
