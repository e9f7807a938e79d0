#!/usr/bin/env bash
# Our daemon against Istio's own ztunnel, both ways, on two network namespaces (run as root).
#
#   scripts/interop-istio.sh <istio/ztunnel checkout>
#
# The checkout must hold a build of Istio's ztunnel with its `testing` feature (whose fake CA
# signs with the test root in `src/tls/`), for example
#   cargo build --bin ztunnel --no-default-features --features tls-aws-lc,testing
# (`target/debug/ztunnel`; ISTIO_ZTUNNEL names another binary). Where GitHub cannot be
# reached, drop the `tls-boring` feature and its git dependency from its Cargo.toml first.
# Our daemon (ZTUNNEL, default target/debug/ztunnel) runs on host a (10.78.0.1, node capture),
# Istio's in its dedicated mode on host c (10.78.0.3); our in-process CA signs with Istio's
# test root, so both trust the same root. Checked, each way: 30 MB with SHA-256 compared, 150
# connections at once (two pooled tunnel connections), a server that speaks first, and an
# AuthorizationPolicy DENY of the other's identity (refused, counted by ours); then Istio's
# ztunnel under COMPLIANCE_POLICY=pqc (X25519MLKEM768 only); then ours allowed 300 streams per
# connection, more than Istio's accepts, holding 300 open at once. Not part of the test command:
# Istio's ztunnel is not published where CI can fetch it.
set -euo pipefail
src=${1:?usage: $0 <istio/ztunnel checkout>}
here=$(cd "$(dirname "$0")/.." && pwd)
ZT=${ZTUNNEL:-$here/target/debug/ztunnel}
IZ=${ISTIO_ZTUNNEL:-$src/target/debug/ztunnel}
for f in "$ZT" "$IZ" "$src/src/tls/root-cert.pem" "$src/src/tls/ca-key.pem"; do
  [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done
D=$(mktemp -d /tmp/interop-istio.XXXXXX)
A=zi$$a C=zi$$c
cleanup() {
  for p in "$D"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  ip netns pids "$A" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids "$C" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$A"
ip netns add "$C"
ip link add "${A}0" netns "$A" type veth peer name "${C}0" netns "$C"
ip -n "$A" addr add 10.78.0.1/24 dev "${A}0"
ip -n "$C" addr add 10.78.0.3/24 dev "${C}0"
for n in "$A" "$C"; do ip -n "$n" link set lo up; done
ip -n "$A" link set "${A}0" up
ip -n "$C" link set "${C}0" up
# In-pod redirection on a; on c, its applications' connections to port 8080 and 2525 go to
# Istio's outbound listener (its own sockets carry mark 0x539).
ip netns exec "$A" nft -f - <<'N'
table inet zt_interop {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :15001
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
}
N
ip netns exec "$C" nft -f - <<'N'
table inet zt_interop {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    ip daddr 127.0.0.0/8 return
    tcp dport { 8080, 2525 } redirect to :15001
  }
}
N
mkdir -m 700 "$D/ca"
for f in root-cert.pem ca-cert.pem cert-chain.pem; do cp "$src/src/tls/root-cert.pem" "$D/ca/$f"; done
install -m 600 "$src/src/tls/ca-key.pem" "$D/ca/ca-key.pem"

# Writes both daemons' views: the two workloads and, with "deny", a DENY of the other's identity.
views() {
  cat > "$D/a.yaml" <<'Y'
trustDomain: cluster.local
namespaces: [{name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}]
workloads:
- {uid: uid-client, name: client, namespace: demo, serviceAccount: client, node: node-a, ips: [10.78.0.1], protocol: HBONE}
- {uid: uid-server, name: server, namespace: demo, serviceAccount: server, node: node-c, ips: [10.78.0.3], protocol: HBONE}
Y
  cat > "$D/c.yaml" <<'Y'
workloads:
- {uid: "cluster1//v1/Pod/demo/server", name: server, namespace: demo, serviceAccount: server, trustDomain: cluster.local, workloadIps: [10.78.0.3], protocol: HBONE, node: node-c, network: "", services: {}}
- {uid: "cluster1//v1/Pod/demo/client", name: client, namespace: demo, serviceAccount: client, trustDomain: cluster.local, workloadIps: [10.78.0.1], protocol: HBONE, node: node-a, network: "", services: {}}
services: []
Y
  if [ "${1:-}" = deny ]; then
    cat >> "$D/a.yaml" <<'Y'
policies:
- apiVersion: security.ztunnel.dev/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-server, namespace: demo}
  spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/server]}}]}]}
Y
    cat >> "$D/c.yaml" <<'Y'
policies:
- {name: deny-client, namespace: demo, scope: Namespace, action: Deny, dryRun: false, rules: [[[{principals: [!Exact "cluster.local/ns/demo/sa/client"]}]]]}
Y
  else
    echo "policies: []" >> "$D/c.yaml"
  fi
}

# Starts both daemons (extra environment for Istio's in $1, extra flags for ours in $2) and
# waits until both are ready.
start() {
  for p in "$D"/ours.pid "$D"/istio.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$D/a-state"
  ip netns exec "$A" "$ZT" run --capture-mode node --node-name node-a --trust-domain cluster.local \
    --discovery-file "$D/a.yaml" --state-dir "$D/a-state" --ca-dir "$D/ca" --drain-grace 1s \
    ${2:-} >> "$D/ours.log" 2>&1 &
  echo $! > "$D/ours.pid"
  ip netns exec "$C" env PROXY_MODE=dedicated PROXY_WORKLOAD_INFO=demo/server/server FAKE_CA=true \
    XDS_ADDRESS= CA_ADDRESS= LOCAL_XDS_PATH="$D/c.yaml" ENABLE_ORIG_SRC=false PACKET_MARK=1337 \
    NODE_NAME=node-c ${1:-} "$IZ" >> "$D/istio.log" 2>&1 &
  echo $! > "$D/istio.pid"
  for _ in $(seq 100); do
    if ip netns exec "$A" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready 2>/dev/null &&
      ip netns exec "$C" curl -sf -o /dev/null http://127.0.0.1:15021/healthz/ready 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "the daemons did not become ready; logs in $D" >&2
  exit 1
}

# Applications: an echo server (answers "<peer ip>]:" and what it read once the client
# half-closes) on 8080 and a server that speaks first on 2525, in both hosts.
cat > "$D/apps.py" <<'P'
import hashlib, os, socket, sys, threading
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(256)
    while True:
        c, a = s.accept(); threading.Thread(target=handle, args=(c, a), daemon=True).start()
def echo(c, a):
    data = bytearray()
    while (d := c.recv(1 << 20)): data += d
    c.sendall(a[0].encode() + b"]:" + data); c.close()
def greet(c, a):
    c.sendall(b"220 hello\n"); d = c.recv(100); c.sendall(b"250 " + d); c.close()
def exchange(host, size):
    c = socket.create_connection((host, 8080), timeout=60)
    payload = os.urandom(size)
    t = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR))); t.start()
    got = bytearray()
    while (d := c.recv(1 << 20)): got += d
    t.join()
    return hashlib.sha256(got[got.index(b"]:") + 2:]).digest() == hashlib.sha256(payload).digest()
def many(host, n, size):
    ok = []; barrier = threading.Barrier(n)
    def one():
        try:
            barrier.wait(60); ok.append(exchange(host, size))
        except Exception as e:
            ok.append(False)
    ts = [threading.Thread(target=one) for _ in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return ok.count(True)
def held(host, n):
    # n connections to the greeting server, each holding until every one has its greeting.
    ok = []; barrier = threading.Barrier(n)
    def one():
        try:
            c = socket.create_connection((host, 2525), timeout=30)
            g = c.recv(100)
            barrier.wait(30)
            c.sendall(b"HELO\n"); ok.append(g == b"220 hello\n" and c.recv(100) == b"250 HELO\n")
        except Exception:
            ok.append(False); barrier.abort()
    ts = [threading.Thread(target=one) for _ in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return ok.count(True)
def first(host):
    c = socket.create_connection((host, 2525), timeout=10)
    g = c.recv(100); c.sendall(b"HELO\n"); r = c.recv(100)
    return g == b"220 hello\n" and r == b"250 HELO\n"
cmd = sys.argv[1]
if cmd == "serve":
    threading.Thread(target=serve, args=(2525, greet), daemon=True).start(); serve(8080, echo)
elif cmd == "bulk": sys.exit(0 if exchange(sys.argv[2], int(sys.argv[3])) else 1)
elif cmd == "many": n = int(sys.argv[3]); sys.exit(0 if many(sys.argv[2], n, 10000) == n else 1)
elif cmd == "first": sys.exit(0 if first(sys.argv[2]) else 1)
elif cmd == "held": n = int(sys.argv[3]); sys.exit(0 if held(sys.argv[2], n) == n else 1)
elif cmd == "refused":
    try: sys.exit(1 if exchange(sys.argv[2], 100) else 0)
    except OSError: sys.exit(0)
P
ip netns exec "$A" python3 "$D/apps.py" serve > /dev/null 2>&1 &
echo $! > "$D/app-a.pid"
ip netns exec "$C" python3 "$D/apps.py" serve > /dev/null 2>&1 &
echo $! > "$D/app-c.pid"

failed=0
check() {
  local what=$1; shift
  if "$@"; then echo "ok    $what"; else echo "FAIL  $what"; failed=1; fi
}
ours() { ip netns exec "$A" python3 "$D/apps.py" "$1" 10.78.0.3 "${@:2}"; }
istio() { ip netns exec "$C" python3 "$D/apps.py" "$1" 10.78.0.1 "${@:2}"; }
refusals() {
  ip netns exec "$A" curl -s http://127.0.0.1:15020/metrics |
    awk -v r="reason=\"$1\"" 'index($0, "ztunnel_refusals_total{") == 1 && index($0, r) { print $2 }'
}

views
start
sleep 0.5
for dir in ours istio; do
  to=$([ $dir = ours ] && echo "ours -> Istio's" || echo "Istio's -> ours")
  check "$to: 30 MB each way, SHA-256 equal" $dir bulk 30000000
  check "$to: 150 connections at once" $dir many 150
  check "$to: the server speaks first" $dir first
done
views deny
start
sleep 0.5
check "ours -> Istio's, Istio's policy denies ours: refused" ours refused
check "Istio's -> ours, our policy denies Istio's: refused" istio refused
check "our daemon counted both" test "$(refusals outbound_denied_by_destination)" = 1 -a \
  "$(refusals policy_denied)" = 1
views
start COMPLIANCE_POLICY=pqc
sleep 0.5
check "ours -> Istio's (pqc only)" ours bulk 100000
check "Istio's (pqc only) -> ours" istio bulk 100000
# Ours allowed more streams per connection than Istio's accepts (200): it opens another.
start "" "--pool-max-streams 300"
sleep 0.5
check "ours (300 streams per connection allowed) -> Istio's: 300 held at once" ours held 300
if [ $failed = 0 ]; then
  rm -rf "$D"
  echo "all passed"
else
  echo "logs: $D/ours.log, $D/istio.log" >&2
  exit 1
fi
