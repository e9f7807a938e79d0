#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian or Ubuntu machine (run as root).
# Safe to run again: it installs only what is missing.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need+=(containernetworking-plugins)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# An independent HBONE peer for the tests: Python's `h2` (tests/peers/hbone_client.py).
command -v python3 >/dev/null 2>&1 || need_python=1
if [ -n "${need_python:-}" ] || ! python3 -c 'import h2' 2>/dev/null; then
  if [ -n "${need_python:-}" ] || ! python3 -m pip install --quiet 'h2==4.1.0' >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-h2 >/dev/null
  fi
fi
python3 -c 'import h2' || {
  echo "python3 with the h2 module is missing: the HBONE tests use it as an independent peer" >&2
  exit 1
}
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain (https://rustup.rs), then run this again" >&2
  exit 1
fi
if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "kubectl (with kustomize) is missing: the deploy/ test renders the manifests with" \
    "\`kubectl kustomize\`; install kubectl (https://kubernetes.io/docs/tasks/tools/), then run this again" >&2
  exit 1
fi
# The real Kubernetes control plane the tests run against (kube-apiserver and etcd, built from
# their Go modules and cached outside the clone; about 10 minutes the first time on 2 cores).
bash "$(dirname "$0")/../tools/controlplane/build.sh" >/dev/null
# Istio's own CRDs (from the istio.io/api Go module) and the Gateway API's Gateway and
# GatewayClass (from sigs.k8s.io/gateway-api), for the tests of the Istio-compatible setting.
bash "$(dirname "$0")/../tools/istio/crds.sh" >/dev/null
bash "$(dirname "$0")/../tools/istio/crds.sh" gateway-api >/dev/null
# helm (from its Go module, cached outside the clone), for the tests of the Helm chart.
bash "$(dirname "$0")/../tools/helm/build.sh" >/dev/null
