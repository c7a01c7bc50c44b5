# tupper — set-up, tests, a demo run and benchmarks. Every target installs what it needs itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TUPPER := $(VENV)/bin/tupper
APT_PACKAGES := systemd-container btrfs-progs libbtrfsutil-dev libsystemd-dev pkg-config debootstrap dbus python3-venv python3-dev gcc nftables python3-nftables apache2-utils bash-completion zstd resource-agents libxml2-utils corosync pacemaker pacemaker-cli-utils
# The venv runs on Debian's own CPython, built with profile-guided optimisation: here a CLI call starts in
# ~30 ms on it, ~45 ms on an unoptimised build (a pyenv one, first on PATH on some machines), and tupperd
# and the tests run faster too. A venv made on another Python is made again (the stamp's name changed with it).
PYTHON3 ?= /usr/bin/python3
STAMP_APT := $(VENV)/.apt-done-$(notdir $(PYTHON3))
STAMP_PIP := $(VENV)/.pip-done
SPEC ?= examples/web.toml

DBUS_POLICY := /etc/dbus-1/system.d/org.tupper1.conf
DBUS_SERVICE := /usr/share/dbus-1/system-services/org.tupper1.service
TUPPERD := $(abspath $(VENV))/bin/tupperd

.PHONY: setup bus test unit lint fuzz run bench image clean help completion man ocf
.PHONY: soak cluster cluster-down

help:
	@echo "make setup   install Debian packages and the venv, shell completion and the man page (idempotent)"
	@echo "make completion / make man   (re)generate and install bash and zsh completion / man tupper from the parser"
	@echo "make run     set up, build the base image if missing, and boot $(SPEC)"
	@echo "make test    set up and run the whole test suite (needs root)"
	@echo "make unit    only the fast unit tests"
	@echo "make lint    ruff and mypy over tupper/, tests/ and bench/ (CI runs it too)"
	@echo "make fuzz    long property-based fuzz run (hypothesis, 50 000 examples per test)"
	@echo "make bench   benchmarks against plain systemd-nspawn; see docs/benchmarks.md"
	@echo "make soak    200 run/stop/rm cycles, 200 execs, 50 live upgrades through tupperd; fails on any leak"
	@echo "make cluster / make cluster-down   a 3-node Corosync + Pacemaker test cluster in namespaces (docs/fleet.md)"

setup: $(STAMP_PIP) bus completion man ocf

# Shell completion and the man page are generated from the parser at build time (shtab, argparse-manpage:
# build dependencies in the [test] extra), so tupper pays nothing for them when it runs.
GEN := build/gen
CLI_SOURCES := $(wildcard tupper/cli/*.py) tupper/__init__.py
COMPLETION_BASH := /usr/share/bash-completion/completions/tupper
COMPLETION_ZSH := /usr/share/zsh/vendor-completions/_tupper
MANPAGE := /usr/local/share/man/man1/tupper.1

completion: $(GEN)/tupper.bash $(GEN)/_tupper
	@install -D -m 644 $(GEN)/tupper.bash $(COMPLETION_BASH)
	@install -D -m 644 $(GEN)/_tupper $(COMPLETION_ZSH)

$(GEN)/tupper.bash $(GEN)/_tupper: $(STAMP_PIP) $(CLI_SOURCES)
	@mkdir -p $(GEN)
	$(PY) -m tupper.cli.completion bash > $(GEN)/tupper.bash.tmp && mv $(GEN)/tupper.bash.tmp $(GEN)/tupper.bash
	$(PY) -m tupper.cli.completion zsh > $(GEN)/_tupper.tmp && mv $(GEN)/_tupper.tmp $(GEN)/_tupper

man: $(GEN)/tupper.1
	@install -D -m 644 $(GEN)/tupper.1 $(MANPAGE)

$(GEN)/tupper.1: $(STAMP_PIP) $(CLI_SOURCES) docs/tupper.1.include
	@mkdir -p $(GEN)
	$(PY) -m tupper.cli.completion man-include docs/tupper.1.include > $(GEN)/tupper.1.include
	$(VENV)/bin/argparse-manpage --module tupper.cli.main --function build_parser --prog tupper --project-name tupper \
		--version "$$($(PY) -c 'import tupper; print(tupper.__version__)')" --manual-title "tupper manual" \
		--description "containers that boot systemd in btrfs snapshots" --include $(GEN)/tupper.1.include --output $@.tmp
	@mv $@.tmp $@

# The OCF resource agent ocf:tupper:container (tupper/cli/ocf.py), for Pacemaker clusters (docs/fleet.md).
OCF_AGENT := /usr/lib/ocf/resource.d/tupper/container
ocf: $(STAMP_PIP)
	@install -d -m 755 $(dir $(OCF_AGENT))
	@sed 's|@PYTHON@|$(abspath $(PY))|' ocf/container.in > $(OCF_AGENT).tmp && chmod 755 $(OCF_AGENT).tmp && mv $(OCF_AGENT).tmp $(OCF_AGENT)

# tupperd's D-Bus policy and activation file, and a system bus where none runs (hosts without systemd).
bus: $(STAMP_PIP)
	@getent group tupper >/dev/null || { groupadd --system tupper && echo "made the admin group tupper (its members may call tupperd's mutating methods)"; }
	@install -D -m 644 dbus/org.tupper1.conf $(DBUS_POLICY)
	@sed 's|@TUPPERD@|$(TUPPERD)|' dbus/org.tupper1.service.in > $(DBUS_SERVICE).tmp && mv $(DBUS_SERVICE).tmp $(DBUS_SERVICE)
	@if [ -d /run/systemd/system ]; then \
		sed -e 's|@TUPPERD@|$(TUPPERD)|' -e 's|@PREFIX@|$(CURDIR)|' systemd/tupperd.service.in > /etc/systemd/system/tupperd.service; \
		systemctl daemon-reload; \
	fi
	@if dbus-send --system --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1; then \
		true; \
	else \
		echo "no system bus is running: starting one (dbus-daemon --system)"; \
		rm -f /run/dbus/pid /run/dbus/system_bus_socket; mkdir -p /run/dbus; dbus-daemon --system --fork; \
	fi

$(STAMP_APT):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
		if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$rc; \
	fi
	@if [ -f $(VENV)/pyvenv.cfg ] && ! grep -qx 'home = $(patsubst %/,%,$(dir $(PYTHON3)))' $(VENV)/pyvenv.cfg; then \
		echo "$(VENV) was made with another Python ($$(sed -n 's/^home = //p' $(VENV)/pyvenv.cfg)): making it again with $(PYTHON3)"; \
		rm -rf $(VENV); \
	fi
	@test -d $(VENV) || $(PYTHON3) -m venv $(VENV)
	@touch $@

$(STAMP_PIP): $(STAMP_APT) pyproject.toml
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
	@touch $@

image: setup
	$(TUPPER) image build images/debian-bookworm.toml

run: setup
	@$(TUPPER) store info
	@$(TUPPER) image build images/debian-bookworm.toml
	@if $(TUPPER) status demo >/dev/null 2>&1; then \
		echo "a container named demo exists already (tupper rm -f demo to start afresh):"; \
		$(TUPPER) status demo; \
	else \
		$(TUPPER) run $(SPEC); \
	fi

test: setup
	$(PY) -m pytest tests -v

unit: setup
	$(PY) -m pytest tests/unit -q

lint: $(STAMP_PIP)
	$(VENV)/bin/ruff check tupper tests bench
	$(VENV)/bin/mypy

fuzz: setup
	TUPPER_FUZZ=1 $(PY) -m pytest tests/unit/test_fuzz.py -q

bench: setup
	$(PY) bench/run.py

soak: setup
	$(PY) bench/soak.py

cluster: image
	$(PY) tests/cluster/testcluster.py up

cluster-down:
	$(PY) tests/cluster/testcluster.py down

clean:
	rm -rf $(VENV) build *.egg-info
