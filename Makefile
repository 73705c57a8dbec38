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
	$(PY) -m pip install -q --no-deps -e .
	XRAYOPS_PROGRESS=0 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache

# Optional Debian packages for the network-source tests (Orthanc + DICOMweb plugin, dcmtk's
# storescu); without them those tests skip with a reason. Needs root; `make test` does not.
system-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y orthanc orthanc-dicomweb orthanc-gdcm dcmtk
