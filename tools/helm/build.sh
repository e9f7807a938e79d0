#!/usr/bin/env bash
# Builds `helm` from its Go module (`helm.sh/helm/v4`, command `cmd/helm`) at the release pinned
# in go.mod beside this script, for the tests of the Helm chart (deploy/charts/ztunnel).
#
# The binary is cached outside the clone, in $ZTUNNEL_HELM_CACHE (default
# /var/cache/ztunnel/helm), in a directory named after the version and a hash of go.mod and
# go.sum: a later run on the same machine reuses it, a change of the pin builds anew. Prints
# that directory on stdout (everything else goes to stderr).
#
# The first build on a 2-core machine takes a few minutes (module downloads included).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${ZTUNNEL_HELM_CACHE:-/var/cache/ztunnel/helm}"

if ! command -v go >/dev/null 2>&1; then
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [ -x "$g" ] && export PATH="$(dirname "$g"):$PATH" && break
  done
fi
command -v go >/dev/null 2>&1 || {
  echo "go is missing: helm is built from its Go module (install Go 1.26 or newer)" >&2
  exit 1
}

version="$(awk '$1 == "helm.sh/helm/v4" { print $2; exit }' "$here/go.mod")"
[ -n "$version" ] || {
  echo "cannot read the pinned helm version from $here/go.mod" >&2
  exit 1
}
hash="$(cat "$here"/go.{mod,sum} | sha256sum | cut -c1-12)"
out="$cache_root/$version-$hash"

if [ -x "$out/helm" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root"
tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
echo "building helm $version into $out" >&2
export CGO_ENABLED=0 GOFLAGS=-mod=mod
# The version `helm version` reports; helm's own release build sets it the same way.
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version"
ldflags="$ldflags -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
(cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$tmp/helm" helm.sh/helm/v4/cmd/helm)
"$tmp/helm" version >&2
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "built helm in $((SECONDS - start)) s" >&2
echo "$out"
