# The two commands of the README. Both create .venv when missing and (re)install when
# pyproject.toml changed, so they work on a fresh machine with nothing installed by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xrayops-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean lint system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xrayops demo --out outputs/demo

test: $(STAMP)
	-@$(MAKE) --no-print-directory system-deps
	$(PY) -m pip install -q --no-deps -e .
	XRAYOPS_PROGRESS=0 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache

# Debian packages some tests drive for real: Orthanc + its DICOMweb plugin and dcmtk's storescu
# (network sources, the routing node), dicom3tools' dciodvfy (IOD checks of synth's objects and the
# structured reports), Chromium (the dashboard, change records). `make test` tries them best-effort, only
# when one is missing and apt-get can run as root; without them those tests skip with a reason.
SYSTEM_BINS := Orthanc storescu chromium dciodvfy
SYSTEM_PKGS := orthanc orthanc-dicomweb orthanc-gdcm dcmtk chromium dicom3tools
system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "system-deps: missing$$missing; not root or no apt-get, so those tests will skip"; exit 0; fi; \
	echo "system-deps: installing $(SYSTEM_PKGS) (missing:$$missing)"; \
	( timeout 180 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 420 apt-get install -y -qq $(SYSTEM_PKGS) ) >/dev/null 2>&1 \
	  || echo "system-deps: apt-get failed; the tests that need$$missing will skip"
