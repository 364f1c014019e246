#!/usr/bin/env bash
# Builds the weir image with podman: a minimal Debian base made by debootstrap from this
# machine's own apt mirror (no container registry needed), then `weir` and `weir-cni` (release
# builds) on top. Prints the image name. `--test` also runs `weir --version` and the CNI
# install step from the image.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "error: image builds need root (podman, debootstrap)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image="localhost/weir:${version}"
base="localhost/weir-base:bookworm-netfilter"
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in podman debootstrap; do
  command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "image: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The first Debian mirror apt uses here (deb822 .sources or a one-line sources.list).
mirror() {
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -1)
  echo "$m"
}

if ! podman image exists "$base"; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "image: debootstrap of a minimal bookworm into $root"
  # libelf1 and zlib1g for libbpf; iproute2 and util-linux (nsenter) for weir-cni and the
  # agent; nftables, iptables and conntrack for the netfilter dataplanes; ca-certificates for
  # the API server's TLS.
  debootstrap --variant=minbase --include=libelf1,zlib1g,iproute2,util-linux,nftables,iptables,conntrack,ca-certificates \
    bookworm "$root" "$(mirror)" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import - "$base" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

cargo build --release -q -p weir -p weir-cni
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp target/release/weir target/release/weir-cni deploy/image/Containerfile "$ctx"/
podman build -q --build-arg BASE="$base" -t "$image" "$ctx" >/dev/null
echo "$image"

if [ "${1:-}" = "--test" ]; then
  # crun refuses hosts where cgroup v1 and v2 are mixed ("hybrid"); runc runs there. Limits
  # are set low explicitly: some sandboxes refuse raising them to podman's defaults.
  run=(podman)
  if [ "$(stat -fc %T /sys/fs/cgroup)" != "cgroup2fs" ]; then
    command -v runc >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends runc >/dev/null
    run+=(--runtime runc)
  fi
  run+=(run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  out=$("${run[@]}" "$image" weir --version)
  echo "image: $out"
  [ "$out" = "weir $version" ] || { echo "error: weir --version said: $out" >&2; exit 1; }
  host=$(mktemp -d)
  mkdir -p "$host/bin" "$host/net.d"
  "${run[@]}" -v "$host/bin:/host/opt/cni/bin" -v "$host/net.d:/host/etc/cni/net.d" \
    "$image" weir cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d
  test -x "$host/bin/weir-cni" && test -s "$host/net.d/05-weir.conflist"
  # The installed plugin runs on the host and answers VERSION.
  echo '{"cniVersion":"1.1.0"}' | CNI_COMMAND=VERSION "$host/bin/weir-cni" | grep -q '"1.1.0"'
  rm -rf "$host"
  echo "image: ok (weir --version, weir cni install, weir-cni VERSION)"
fi
