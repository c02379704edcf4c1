# Two commands do everything on a fresh machine (Python 3.10+, no GPU needed):
#   make train     set up .venv and train the default Switch MoE on the standard library
#   make test      set up .venv and run the whole test suite (what CI runs)
# `make browser` (root) installs what the dashboard's browser tests drive; CI runs it first.
# Extra arguments: make train ARGS="moe=gshard steps=200"   make test PYTEST_ARGS="-m 'not slow'"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup browser train test bench dash clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "make: setting up $(VENV): torch (the CPU build) and the pinned dependencies; 1-2 minutes on a 2-core machine, once"
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned exactly: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check --progress-bar on "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -e ".[all,test]"
	rm -f $(VENV)/.installed-*
	touch $@

train: $(STAMP)
	$(BIN)/moe-train $(ARGS)

# The dashboard's browser tests drive Debian's chromium and chromium-driver; without them those
# tests skip with a line saying so.  A separate step (it installs system packages, as root):
# .ci/run calls it before `make test`; on your machine run it when you want those tests.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "make: chromium and chromedriver are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make: installing chromium and chromium-driver (apt-get) for the dashboard's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make: not root: install them with sudo apt-get install chromium chromium-driver"; exit 1; fi

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/moe-bench layer

dash: $(STAMP)
	$(BIN)/moe-dash runs

clean:
	rm -rf $(VENV) runs multirun outputs bench_results .pytest_cache build *.egg-info
