# Two commands do all set-up on a fresh Debian 12 machine (run as root for the apt step):
#   make demo   installs what is needed and runs a demo agent under `kernel exec`
#   make test   installs what is needed and runs the whole test suite (lint, types, tests), then,
#               as root, the tiers that do not need root again as an ordinary user
.PHONY: demo test test-user bootstrap lint bench clean

VENV := .venv
BIN := $(VENV)/bin

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	@scripts/demo.sh

lint: bootstrap
	$(BIN)/ruff check kernel syscalls sandbox tests benchmarks
	$(BIN)/mypy

test: bootstrap lint
	@scripts/run-tests.sh

# The user pass alone (as root): the tiers that do not need root, run as an ordinary user.
test-user: bootstrap
	@scripts/run-user-tests.sh

bench: bootstrap
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
