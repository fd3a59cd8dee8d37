#!/usr/bin/env bash
# Fetches Fashion-MNIST through Debian's package archive only: the .deb of
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 is downloaded with `apt-get download`
# (nothing is installed into the system), checked against its pinned sha256, unpacked with
# `dpkg-deb -x` in a temporary folder, and its four gzipped IDX files are moved into DEST
# (ignored by git). The data loader reads the .gz files as they are.
# Usage: scripts/fetch-fashion-mnist.sh [DEST]   (default: data/fashion-mnist next to this script's repo)
set -euo pipefail
PKG="dataset-fashion-mnist"
VERSION="0.0~git20200523.55506a9-1"
SHA256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
INNER="usr/share/datasets/fashion-mnist"
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-"$repo/data/fashion-mnist"}
have=1
for f in $FILES; do [ -f "$dest/$f" ] || have=0; done
if [ "$have" = 1 ]; then
  echo "Fashion-MNIST already in $dest"
  exit 0
fi
for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to fetch $PKG" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download "$PKG=$VERSION" >"$work/apt.log" 2>&1); then
  cat "$work/apt.log" >&2
  echo "error: apt-get download $PKG=$VERSION failed (run 'apt-get update' first if the package is unknown)" >&2
  exit 1
fi
debs=("$work"/*.deb)
[ -f "${debs[0]}" ] || { echo "error: apt-get download left no .deb in $work" >&2; exit 1; }
deb=${debs[0]}
got=$(sha256sum "$deb" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "error: $(basename "$deb") has sha256 $got, expected $SHA256" >&2
  exit 1
fi
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$dest"
for f in $FILES; do
  [ -f "$work/root/$INNER/$f" ] || { echo "error: $INNER/$f missing from $PKG $VERSION" >&2; exit 1; }
  mv "$work/root/$INNER/$f" "$dest/$f.part"
  mv "$dest/$f.part" "$dest/$f"
done
echo "Fashion-MNIST ($PKG $VERSION, sha256 verified) in $dest"
