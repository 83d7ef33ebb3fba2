# PLD flywheel. `make flywheel` runs the main job, `make test` the tests; both set up first.
SHELL := /bin/bash
PY312 ?= $(shell for p in "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12" $$(command -v python3.12); do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := libosmesa6 libegl1 libegl-mesa0 libgl1-mesa-dri libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

TEST_APT_PKGS := chromium chromium-driver   # the UI tests' headless browser

.PHONY: setup apt apt-install test-setup flywheel test bench clean

setup: apt $(VENV)/.installed

# Headless MuJoCo rendering (images mode) needs Mesa's EGL/OSMesa; installed only when missing.
apt:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_PKGS)"

apt-install:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY312)" && test -x "$(PY312)" || { echo "Python 3.12 not found (LeRobot 0.6 needs it): set PY312=/path/to/python3.12"; exit 2; }
	@test -x $(PY) || $(PY312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

flywheel: setup
	$(VENV)/bin/pld flywheel

# The tests also need the ray extra (a Ray cluster test) and Chromium (the MLflow and Prefect UIs in a browser).
test-setup: setup $(VENV)/.installed-test
	@$(MAKE) --no-print-directory apt-install PKGS="$(TEST_APT_PKGS)"

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[test,ray]"
	@touch $@

# Most tests are one single-threaded simulation or training at a time: two pytest-xdist workers keep both cores of a
# 2-core machine busy (TEST_WORKERS=1 runs them one by one; more than the cores only adds contention).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: test-setup
	$(PY) -m pytest -q -rs -p no:cacheprovider --timeout 1500 --durations=15 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

bench: setup
	$(VENV)/bin/pld bench all

clean:
	rm -rf $(VENV) .pytest_cache
