#!/usr/bin/env bash
# Builds the mailtriage image with podman and no registry: the base is a
# Debian bookworm "minbase" made by mmdebstrap from Debian's own packages and
# imported once as localhost/debian:bookworm-minbase; the Containerfile adds
# the binary (stripped), the default configuration and the user.
#
#   deploy/container/build.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/mailtriage (built when missing), TAG to
# localhost/mailtriage:<version>. Needs podman and mmdebstrap (Debian packages).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$root/target/release/mailtriage}
[[ $bin = /* ]] || bin=$PWD/$bin
cd "$root"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${2:-localhost/mailtriage:$version}
if [[ ! -x $bin ]]; then
  [[ $# -eq 0 ]] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
  cargo build --release --locked
fi
base=localhost/debian:bookworm-minbase
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
if ! podman image exists "$base"; then
  mmdebstrap --variant=minbase --quiet bookworm "$ctx/base.tar"
  podman import --quiet "$ctx/base.tar" "$base" >/dev/null
  rm -f "$ctx/base.tar"
fi
# A build context with only what the image needs (not target/).
mkdir -p "$ctx/conf"
cp "$bin" "$ctx/mailtriage"
strip --strip-unneeded "$ctx/mailtriage"
cp conf/mailtriage.toml "$ctx/conf/"
podman build --quiet --isolation=chroot --build-arg "BASE=$base" --build-arg BINARY=mailtriage \
  -f deploy/container/Containerfile -t "$tag" "$ctx" >/dev/null
echo "$tag"
