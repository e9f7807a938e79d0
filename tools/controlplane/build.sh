#!/usr/bin/env bash
# Builds the Kubernetes control plane that the tests run against: `kube-apiserver` from the
# `k8s.io/kubernetes` module and `etcd` from `go.etcd.io/etcd/server/v3`, at the releases pinned
# in the two Go modules beside this script (kube-apiserver/go.mod, etcd/go.mod).
#
# The binaries are cached outside the clone, in $ZTUNNEL_CONTROLPLANE_CACHE (default
# /var/cache/ztunnel/controlplane), in a directory named after the versions and a hash of the
# modules' go.mod and go.sum: a later run on the same machine reuses them, a change of a pin
# builds anew. Prints that directory on stdout (everything else goes to stderr).
#
# The first build on a 2-core machine takes about 10 minutes (module downloads included).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${ZTUNNEL_CONTROLPLANE_CACHE:-/var/cache/ztunnel/controlplane}"

if ! command -v go >/dev/null 2>&1; then
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [ -x "$g" ] && export PATH="$(dirname "$g"):$PATH" && break
  done
fi
command -v go >/dev/null 2>&1 || {
  echo "go is missing: the control plane is built from its Go modules (install Go 1.26 or newer)" >&2
  exit 1
}

version_of() { # module directory, module path
  awk -v m="$2" '$1 == m || ($1 == "require" && $2 == m) { print ($1 == "require") ? $3 : $2; exit }' "$1/go.mod"
}
kube_version="$(version_of "$here/kube-apiserver" k8s.io/kubernetes)"
etcd_version="$(version_of "$here/etcd" go.etcd.io/etcd/server/v3)"
[ -n "$kube_version" ] && [ -n "$etcd_version" ] || {
  echo "cannot read the pinned versions from $here/*/go.mod" >&2
  exit 1
}
hash="$(cat "$here"/kube-apiserver/go.{mod,sum} "$here"/kube-apiserver/main.go \
  "$here"/etcd/go.{mod,sum} "$here"/etcd/main.go | sha256sum | cut -c1-12)"
out="$cache_root/kube-$kube_version-etcd-$etcd_version-$hash"

if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root"
tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
echo "building the test control plane (kube-apiserver $kube_version, etcd $etcd_version) into $out;" \
  "the first build takes about 10 minutes" >&2
export CGO_ENABLED=0 GOFLAGS=-mod=mod
# The version the server reports (kubectl reads it); the Kubernetes build sets it the same way.
major="${kube_version#v}"
major="${major%%.*}"
minor="${kube_version#v*.}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags="$ldflags -X $pkg.gitTreeState=clean"
done
(cd "$here/kube-apiserver" && go build -trimpath -ldflags "$ldflags" -o "$tmp/kube-apiserver" .)
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" .)
"$tmp/etcd" --version >&2
"$tmp/kube-apiserver" --version >&2
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "built the test control plane in $((SECONDS - start)) s" >&2
echo "$out"
