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

say "4. ClusterIP load balancing at the socket layer: each node's weir agent programs eBPF hooks on connect/sendmsg/recvmsg/getpeername"
echo "300 fresh TCP connections from ops/client to web.shop:80 (port 80 remapped to the pods' named port 'http', 8080):"
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to web.shop:80 --count 300
echo "The backend is chosen once, at connect(); the application still sees the ClusterIP as its peer (getpeername is translated back)."
echo
echo "UDP to web.shop:53 (remapped to 5353): each datagram exchange is balanced too:"
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to web.shop:53 --protocol udp --count 300
echo
echo "web-sticky has sessionAffinity: ClientIP, so one client always reaches the same pod:"
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to web-sticky.shop:80 --count 100

say "5. What the datapath holds: frontends, backend slots, affinity entries (like cilium bpf lb list)"
show "$WEIR" --cluster "$LAB" bpf lb list
show "$WEIR" --cluster "$LAB" status --node node-2

say "6. Terminating a pod: it keeps serving through its grace period; its endpoint turns serving+terminating and new connections go to the ready pods"
show "$WEIR" --cluster "$LAB" lab terminate shop/web-3 --grace-period 60
sleep 0.5
show $K get endpointslices -n shop -l kubernetes.io/service-name=web -o jsonpath='{range .items[*].endpoints[*]}{.targetRef.name}{"\tready="}{.conditions.ready}{"\tserving="}{.conditions.serving}{"\tterminating="}{.conditions.terminating}{"\n"}{end}'
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to web.shop:80 --count 100

say "7. A Service with no endpoints refuses new connections at once (ECONNREFUSED), it does not time out"
show $K delete pod cart -n shop --grace-period=0 --force
sleep 0.5
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to cart.shop:80 --count 5
