# The two set-up commands of the README: `make demo` and `make test`;
# `make cluster` / `make cluster-down` for the chart on a real one-node Kubernetes.
.PHONY: setup demo test down cluster cluster-down cluster-test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/bkv dev up
	.venv/bin/bkv demo

test: setup
	bash scripts/test.sh

down:
	.venv/bin/bkv dev down

# A one-node Kubernetes on this machine from the official components, the
# image built locally and the chart installed (docs/kubernetes.md). Root only.
cluster: setup
	bash scripts/cluster-up.sh

cluster-down:
	bash scripts/cluster-down.sh

# tests/test_cluster.py: brings the node up, runs the chart's end-to-end tests, takes it down.
# The set-up step builds the node's binaries and images first (never inside a test).
cluster-test:
	BKV_CLUSTER_TESTS=1 bash scripts/setup.sh
	BKV_CLUSTER_TESTS=1 bash scripts/test.sh tests/test_cluster.py
