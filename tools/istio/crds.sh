#!/usr/bin/env bash
# Fetches CustomResourceDefinitions as their projects publish them in their Go modules, at
# the releases pinned below, for the tests of the Istio-compatible setting, which install them
# on the test API server so that the daemon reads objects the real schemas admitted:
#   crds.sh              Istio's (istio.io/api, kubernetes/customresourcedefinitions.gen.yaml)
#   crds.sh gateway-api  the Gateway API's standard Gateway and GatewayClass
#                        (sigs.k8s.io/gateway-api, config/crd/standard/), the version Istio pins
#
# The file is cached outside the clone, in $ZTUNNEL_CONTROLPLANE_CACHE (default
# /var/cache/ztunnel/controlplane)/<module>-<version>/. Prints its path on stdout.
set -euo pipefail
case "${1:-istio}" in
  istio)
    module=istio.io/api version=v1.32.0 name=istio-api
    files=(kubernetes/customresourcedefinitions.gen.yaml)
    ;;
  gateway-api)
    module=sigs.k8s.io/gateway-api version=v1.6.0 name=gateway-api
    files=(config/crd/standard/gateway.networking.k8s.io_gatewayclasses.yaml
      config/crd/standard/gateway.networking.k8s.io_gateways.yaml)
    ;;
  *)
    echo "usage: $0 [istio|gateway-api]" >&2
    exit 2
    ;;
esac
cache_root="${ZTUNNEL_CONTROLPLANE_CACHE:-/var/cache/ztunnel/controlplane}"
out="$cache_root/$name-$version/customresourcedefinitions.yaml"
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
  echo "go is missing: the CRDs are fetched from the $module Go module" >&2
  exit 1
}
tmp="$(mktemp -d)"
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT
# Outside any module, with a private module cache: nothing of the machine's is touched.
dir="$(cd "$tmp" && GOFLAGS=-mod=mod GOMODCACHE="$tmp/mod" \
  go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
mkdir -p "$(dirname "$out")"
: >"$out.tmp"
for f in "${files[@]}"; do
  [ -s "$dir/$f" ] || {
    echo "$module@$version has no $f" >&2
    exit 1
  }
  # One YAML stream: each file is one or more documents.
  { echo "---"; cat "$dir/$f"; } >>"$out.tmp"
done
mv "$out.tmp" "$out"
echo "$out"
