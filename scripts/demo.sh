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
SET="${LAB}-mc"
if "$WEIR" lab list -o json | grep -q "\"clusterset\": \"$SET\""; then
  "$WEIR" lab down --name "$SET"
fi
teardown() {
  say "Tearing down: weir lab down removes namespaces, links, cgroups, processes and files"
  "$WEIR" lab down --name "$LAB"
  if [ -d "/run/weir/labs/$SET" ]; then "$WEIR" lab down --name "$SET"; fi
}
trap teardown EXIT

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

say "6. Traffic from outside the cluster: NodePorts and LoadBalancer IPs, translated per packet by a tc program on the node's device (BPF conntrack, no netfilter)"
LB_IP=""
for _ in $(seq 50); do
  LB_IP=$($K get service web-public -n shop -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
  [ -n "$LB_IP" ] && break
  sleep 0.1
done
NODE_PORT=$($K get service web-public -n shop -o jsonpath='{.spec.ports[0].nodePort}')
show $K get service web-public -n shop
echo "The lab gave web-public the LoadBalancer IP $LB_IP; the external host routes it to both nodes (ECMP)."
show "$WEIR" --cluster "$LAB" lab connect --from external --to "$LB_IP:80" --count 200
echo "The NodePort $NODE_PORT answers on every node; a pod on the other node is reached with the node's address as source (SNAT),"
echo "a pod on the receiving node sees the client's own address:"
show "$WEIR" --cluster "$LAB" lab connect --from external --to "172.30.0.11:$NODE_PORT" --count 200
echo "What node-1 would do with one more connection, without doing it (a synthetic packet through the loaded programs):"
show "$WEIR" --cluster "$LAB" explain --node node-1 --from 172.30.0.2:40000 --to "172.30.0.11:$NODE_PORT"
echo "The source NAT node-1 applied (client -> node address:port -> backend), and every packet counted by reason:"
"$WEIR" --cluster "$LAB" bpf nat list --node node-1 | sed -n 1,6p
show "$WEIR" --cluster "$LAB" bpf metrics list --node node-1
echo "And the other way: a pod reaching the external host's server leaves behind its node's address (masquerading at tc; TCP, UDP, ping):"
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to 172.30.0.2:80 --count 20
show "$WEIR" --cluster "$LAB" lab exec ops/client -- ping -c 2 -i 0.2 172.30.0.2

say "7. Terminating a pod: it keeps serving through its grace period; its endpoint turns serving+terminating and new connections go to the ready pods"
show "$WEIR" --cluster "$LAB" lab terminate shop/web-3 --grace-period 60
sleep 0.5
show $K get endpointslices -n shop -l kubernetes.io/service-name=web -o jsonpath='{range .items[*].endpoints[*]}{.targetRef.name}{"\tready="}{.conditions.ready}{"\tserving="}{.conditions.serving}{"\tterminating="}{.conditions.terminating}{"\n"}{end}'
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to web.shop:80 --count 100

say "8. A Service with no endpoints refuses new connections at once (ECONNREFUSED), it does not time out"
show $K delete pod cart -n shop --grace-period=0 --force
sleep 0.5
show "$WEIR" --cluster "$LAB" lab connect --from ops/client --to cart.shop:80 --count 5

say "9. Two clusters, one clusterset: each a whole lab cluster, with one etcd and a mesh per cluster (examples/mcs.yaml in both)"
"$WEIR" lab up --name "$SET" --clusters 2 -f "$here/examples/mcs.yaml" > /dev/null
echo "mcs/hello exists in both clusters; exporting it from c1 only:"
show "$WEIR" --cluster "$SET/c1" apply -f "$here/examples/mcs-export.yaml"
sleep 1.5
show "$WEIR" --cluster "$SET/c2" get serviceimports -A -o wide
echo "Pods resolve clusterset names through the lab's DNS (CoreDNS's multicluster semantics):"
show "$WEIR" --cluster "$SET/c2" lab exec mcs/client -- dig +short hello.mcs.svc.clusterset.local
echo "c2's client reaches c1's pod through the ClusterSetIP; c2's own hello is not exported, so it never answers:"
show "$WEIR" --cluster "$SET/c2" lab connect --from mcs/client --to hello.mcs.svc.clusterset.local:80 --count 50
