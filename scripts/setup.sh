#!/usr/bin/env bash
# Installs what building and testing weir needs on a Debian machine, as root, without
# prompting. Safe to run again: it installs only what is missing.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: weir's setup installs packages and its labs create network namespaces: run as root (hint: sudo make ...)" >&2
    exit 1
  fi
}
need_root

export DEBIAN_FRONTEND=noninteractive
# Debian packages: the eBPF toolchain (clang-19, libelf, zlib, pkg-config), make, and the
# tools the lab and its tests drive (iproute2 for ip, procps for pgrep, util-linux for
# nsenter, bash; iptables and conntrack to prove that the datapath bypasses netfilter; ethtool
# for XDP labs; ping for ICMP echo through the masquerade; containernetworking-plugins to
# chain weir-cni with the reference plugins as a runtime would); protobuf-compiler for the
# etcd client's gRPC code, with libprotobuf-dev for the well-known types it imports
# (google/protobuf/*.proto: only a recommendation of protobuf-compiler, which
# --no-install-recommends leaves out); etcd-server for clustersets' etcd, and nftables for their
# partitions (and as a benchmark baseline); bind9-dnsutils (dig) to query the lab DNS as a pod;
# chromium for the service map's browser test.
packages=(clang-19 llvm-19 libelf-dev zlib1g-dev pkg-config make iproute2 procps util-linux bash ca-certificates iptables conntrack ethtool iputils-ping containernetworking-plugins protobuf-compiler libprotobuf-dev etcd-server nftables bind9-dnsutils chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js and npm for the service map's front-end toolchain (ui/: esbuild, and playwright-core
# for its browser test): the machine's if it has them (a Node.js from elsewhere brings its own
# npm, which Debian's npm package conflicts with), else Debian's.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi
# kubectl: use the one on the machine if there is one; otherwise Debian's kubernetes-client.
if ! command -v kubectl >/dev/null 2>&1; then
  missing+=(kubernetes-client)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubernetes-validate (PyPI): make test validates the install manifests offline against a
# current Kubernetes release's schemas. Debian's python3 refuses system-wide pip installs
# (PEP 668) unless told; a pyenv or venv python takes them as they are.
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "setup: installing kubernetes-validate (pip)"
  python3 -m pip install -q kubernetes-validate 2>/dev/null ||
    python3 -m pip install -q --break-system-packages kubernetes-validate
  python3 -c 'import kubernetes_validate' || {
    echo "error: kubernetes-validate was installed but python3 cannot import it" >&2
    exit 1
  }
fi

# The service map's npm packages (ui/package-lock.json), when missing or out of date.
ui="$(dirname "$0")/../ui"
if [ ! -d "$ui/node_modules/playwright-core" ] || [ ! -d "$ui/node_modules/esbuild" ] ||
  [ "$ui/package-lock.json" -nt "$ui/node_modules/.package-lock.json" ]; then
  echo "setup: installing the service map's npm packages (ui/)"
  (cd "$ui" && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "error: no Rust toolchain (cargo) found; weir needs Rust 1.95 or newer from rustup (Debian's cargo is too old)" >&2
  fi
  exit 1
fi
echo "setup: ok ($(cargo --version), $(clang-19 --version | head -1), kubectl $(kubectl version --client -o json 2>/dev/null | grep -o '"gitVersion": *"[^"]*"' | head -1 | cut -d'"' -f4))"
