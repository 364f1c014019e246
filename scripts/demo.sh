#!/usr/bin/env bash
# The weir lab demo: a two-node cluster made of network namespaces, driven with kubectl.
set -euo pipefail
WEIR=${WEIR:-target/debug/weir}
LAB=${LAB:-demo}
here=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

if "$WEIR" lab list -o json | grep -q "\"name\": \"$LAB\""; then
  echo "A lab named $LAB exists already; removing it first."
  "$WEIR" lab down --name "$LAB"
fi
trap 'say "Tearing down: weir lab down removes namespaces, links, cgroups, processes and files"; "$WEIR" lab down --name "$LAB"' EXIT

say "1. Build a lab: weir's API server, an EndpointSlice controller, a kubelet per node, and the manifests of examples/demo.yaml"
KUBECONFIG_FILE=$("$WEIR" lab up --name "$LAB" --nodes 2 -f "$here/examples/demo.yaml")
K="kubectl --kubeconfig $KUBECONFIG_FILE"

say "2. It is a Kubernetes API: kubectl works against it (kubeconfig: $KUBECONFIG_FILE)"
show $K get nodes -o wide
show $K get pods -A -o wide
echo "Each pod is a network namespace with its own cgroup, a veth to its node and an IP from the node's pod CIDR."
show $K get services -n shop
echo "The EndpointSlice controller keeps one slice family per Service; 'web' targets the named port 'http' (8080):"
show $K get endpointslices -n shop

say "3. Every pod answers on its containerPorts with its own name; probe every pod from every pod (TCP 8080)"
show "$WEIR" --cluster "$LAB" lab probe --port 8080
say "   ... and over UDP 5353 (only the web pods declare it, so only their columns answer)"
show "$WEIR" --cluster "$LAB" lab probe --port 5353 --protocol udp

say "4. Ten connections from ops/client to shop/web-2's pod IP (across nodes); the echo server names who answered"
WEB2=$($K get pod web-2 -n shop -o jsonpath='{.status.podIP}')
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to "$WEB2:8080" --count 10

say "5. Terminating a pod: it keeps serving through its grace period, and its endpoint turns serving+terminating"
show "$WEIR" --cluster "$LAB" lab terminate shop/web-3 --grace-period 60
sleep 0.5
show $K get endpointslices -n shop -l kubernetes.io/service-name=web -o jsonpath='{range .items[*].endpoints[*]}{.targetRef.name}{"\tready="}{.conditions.ready}{"\tserving="}{.conditions.serving}{"\tterminating="}{.conditions.terminating}{"\n"}{end}'
echo
echo "Next (issue 3): the weir agent load-balances these Services at the socket layer."
