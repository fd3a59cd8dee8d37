# Sourced by the scripts that run on the GPU machine (from the repository root): puts the CUDA 13,
# cuDNN and NCCL libraries of the machine's PyTorch environment on LD_LIBRARY_PATH, sets Q to the
# CUDA binary (dist/cuda/qtaylor, or dist/cuda/qtaylor.xz / .gz unpacked to /tmp/qtaylor) unless Q is
# set, PY to PyTorch's python, creates $OUT and prints the card.
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/cudnn/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
if [ -z "${Q:-}" ]; then
  Q=dist/cuda/qtaylor
  if [ ! -x "$Q" ] && [ -f dist/cuda/qtaylor.xz ]; then
    "${PY:-/opt/torch/.venv/bin/python}" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' dist/cuda/qtaylor.xz /tmp/qtaylor
    chmod +x /tmp/qtaylor; Q=/tmp/qtaylor
  elif [ ! -x "$Q" ]; then gunzip -c dist/cuda/qtaylor.gz > /tmp/qtaylor; chmod +x /tmp/qtaylor; Q=/tmp/qtaylor; fi
fi
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU visible (a CPU dry run)"
