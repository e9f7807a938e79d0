#!/usr/bin/env bash
# Fetches Istio's CustomResourceDefinitions, as Istio publishes them in its `istio.io/api` Go
# module (kubernetes/customresourcedefinitions.gen.yaml), at the release pinned below, for the
# tests of the Istio-compatible setting: they install Istio's own security.istio.io CRDs on the
# test API server, so the daemon reads objects that Istio's schema admitted.
#
# The file is cached outside the clone, in $ZTUNNEL_CONTROLPLANE_CACHE (default
# /var/cache/ztunnel/controlplane)/istio-api-<version>/. Prints its path on stdout.
set -euo pipefail
version=v1.32.0
cache_root="${ZTUNNEL_CONTROLPLANE_CACHE:-/var/cache/ztunnel/controlplane}"
out="$cache_root/istio-api-$version/customresourcedefinitions.gen.yaml"
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [ -x "$g" ] && export PATH="$(dirname "$g"):$PATH" && break
  done
fi
command -v go >/dev/null 2>&1 || {
  echo "go is missing: Istio's CRDs are fetched from the istio.io/api Go module" >&2
  exit 1
}
tmp="$(mktemp -d)"
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
# Outside any module, with a private module cache: nothing of the machine's is touched.
dir="$(cd "$tmp" && GOFLAGS=-mod=mod GOMODCACHE="$tmp/mod" \
  go mod download -json "istio.io/api@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
src="$dir/kubernetes/customresourcedefinitions.gen.yaml"
[ -s "$src" ] || {
  echo "istio.io/api@$version has no $src" >&2
  exit 1
}
mkdir -p "$(dirname "$out")"
cp "$src" "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
