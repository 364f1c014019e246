# weir: the two commands of the README.
#   make demo   builds weir, installs what is missing, runs the lab demo
#   make test   runs every test (unit, API server, kubectl, lab end to end)
CARGO ?= cargo

.PHONY: demo test build setup fmt lint clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

demo: build
	@WEIR=target/debug/weir scripts/demo.sh

test: build
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
