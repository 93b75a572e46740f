# The two set-up commands of the README: `make demo` and `make test`.
.PHONY: setup demo test down

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/bkv dev up
	.venv/bin/bkv demo

test: setup
	bash scripts/test.sh

down:
	.venv/bin/bkv dev down
