# Two commands do everything on a fresh machine (Python 3.10+, no GPU needed):
#   make train     set up .venv and train the default Switch MoE on the standard library
#   make test      set up .venv and run the whole test suite (what CI runs)
# Extra arguments: make train ARGS="moe=gshard steps=200"   make test PYTEST_ARGS="-m 'not slow'"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup browser train test bench dash clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned exactly: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[all,test]"
	rm -f $(VENV)/.installed-*
	touch $@

train: $(STAMP)
	$(BIN)/moe-train $(ARGS)

# The dashboard's browser tests drive Debian's chromium and chromium-driver.  Installed here
# when missing and we may (root); otherwise those tests skip with a line saying what to install.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt-get) for the dashboard's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: no chromium/chromedriver and not root: the browser tests will skip (sudo apt-get install chromium chromium-driver)"; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/moe-bench layer

dash: $(STAMP)
	$(BIN)/moe-dash runs

clean:
	rm -rf $(VENV) runs multirun outputs bench_results .pytest_cache
