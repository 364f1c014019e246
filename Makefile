# weir: the two commands of the README.
#   make demo   builds weir, installs what is missing, runs the lab demo
#   make test   runs every test (unit, API server, kubectl, lab end to end)
CARGO ?= cargo

.PHONY: demo test build setup fmt lint clean bench image image-test ui

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

demo: build
	@WEIR=target/debug/weir scripts/demo.sh

test: build
	cd ui && npm run --silent check
	$(CARGO) test --workspace

# The service map's bundle (ui/dist/app.js, embedded in the binary) from ui/src.
ui: setup
	cd ui && npm run build

# Benchmarks (not tests): ratios against kube-proxy's layouts measured in the same run.
bench: setup
	@scripts/setup.sh --bench
	$(CARGO) build --release -p weir-bench -p weir
	target/release/weir-bench program 10000
	target/release/weir-bench connect 1,1000,10000 7 3
	target/release/weir-bench api 10000 target/release/weir
	target/release/weir-bench nodeport 1,1000,10000 5 2
	target/release/weir-bench nodeport 1,1000 5 2 remote
	target/release/weir-bench podpod 7 2
	target/release/weir-bench policy 1000 5 2
	target/release/weir-bench prefilter 5 2
	target/release/weir-bench visibility 10 3
	target/release/weir-bench mesh 200 20
	target/release/weir-bench mesh-scale 10 1000
	target/release/weir-bench schedule 20
	target/release/weir-bench switch 10000,100000

# The OCI image (podman; a debootstrap base made here, no registry): weir and weir-cni.
image: setup
	@scripts/image.sh

# Builds the image and runs `weir --version` and the CNI install step from it (slow: not in
# make test).
image-test: setup
	@scripts/image.sh --test

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
