# tupper — set-up, tests, a demo run and benchmarks. Every target installs what it needs itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TUPPER := $(VENV)/bin/tupper
APT_PACKAGES := systemd-container btrfs-progs libbtrfsutil-dev libsystemd-dev pkg-config debootstrap dbus python3-venv gcc nftables python3-nftables apache2-utils
STAMP_APT := $(VENV)/.apt-done
STAMP_PIP := $(VENV)/.pip-done
SPEC ?= examples/web.toml

DBUS_POLICY := /etc/dbus-1/system.d/org.tupper1.conf
DBUS_SERVICE := /usr/share/dbus-1/system-services/org.tupper1.service
TUPPERD := $(abspath $(VENV))/bin/tupperd

.PHONY: setup bus test unit lint fuzz run bench image clean help
.PHONY: soak

help:
	@echo "make setup   install Debian packages and the venv (idempotent)"
	@echo "make run     set up, build the base image if missing, and boot $(SPEC)"
	@echo "make test    set up and run the whole test suite (needs root)"
	@echo "make unit    only the fast unit tests"
	@echo "make lint    ruff and mypy over tupper/, tests/ and bench/ (CI runs it too)"
	@echo "make fuzz    long property-based fuzz run (hypothesis, 50 000 examples per test)"
	@echo "make bench   benchmarks against plain systemd-nspawn; see docs/benchmarks.md"
	@echo "make soak    200 run/stop/rm cycles, 200 execs, 50 live upgrades through tupperd; fails on any leak"

setup: $(STAMP_PIP) bus

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
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@test -d $(VENV) || python3 -m venv $(VENV)
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

clean:
	rm -rf $(VENV) build *.egg-info
