"""Submit the compiled pipeline to a Kubeflow Pipelines endpoint with kfp.Client: one run
(`create_run_from_pipeline_package`) or a recurring run (`create_recurring_run`)."""
from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from pydantic import BaseModel

from xrayops.errors import XrayopsError
from xrayops.logs import get_logger

log = get_logger(__name__)

HEALTHZ = "/apis/v2beta1/healthz"


class SubmitError(XrayopsError, RuntimeError):
    """The KFP endpoint could not be reached or refused the request; the message says which."""


class SubmitResult(BaseModel):
    host: str
    experiment_id: str
    run_id: str | None = None
    recurring_run_id: str | None = None
    cron: str | None = None


def kfp_cron(expression: str) -> str:
    """KFP wants 6-field cron (seconds first); a usual 5-field crontab line gets second 0."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise SubmitError(f"--recurring needs a 5- or 6-field cron expression, got {expression!r}")


def parse_params(pairs: list[str]) -> dict:
    """`KEY=VALUE` pipeline arguments; values are YAML scalars (so 280 is an int, true a bool)."""
    import yaml

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--param needs KEY=VALUE, got {pair!r}")
        params[key.strip()] = yaml.safe_load(value) if value else ""
    return params


def check_reachable(host: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when nothing answers at `host` (any HTTP answer will do)."""
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host must be an http(s) URL, got {host!r}")
    try:
        with urllib.request.urlopen(host.rstrip("/") + HEALTHZ, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered (401/403/404 behind an auth proxy): kfp.Client reports the rest
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(f"KFP endpoint {host} is unreachable: {reason}") from None


def _credentials():
    """In a pod with a projected KFP token (the monitor CronJob), authenticate with it."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    return ServiceAccountTokenVolumeCredentials(path) if Path(path).is_file() else None


def submit(
    host: str,
    package: Path,
    arguments: dict | None = None,
    experiment: str = "xrayops",
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    recurring: str | None = None,
    token: str | None = None,
) -> SubmitResult:
    """Start one run of the pipeline package, or a recurring run when `recurring` (cron) is set."""
    import kfp
    import kfp_server_api
    import urllib3

    check_reachable(host)
    cron = kfp_cron(recurring) if recurring else None
    name = run_name or Path(package).stem
    try:
        # kfp.Client prints experiment/run links on stdout; keep stdout for our JSON answer.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(
                host=host,
                namespace=namespace or "kubeflow",
                existing_token=token,
                credentials=None if token else _credentials(),
            )
            if cron is None:
                run = client.create_run_from_pipeline_package(
                    str(package),
                    arguments=arguments or {},
                    run_name=name,
                    experiment_name=experiment,
                    namespace=namespace,
                    pipeline_root=pipeline_root or None,
                    service_account=service_account or None,
                )
                result = SubmitResult(host=host, experiment_id=run.run_info.experiment_id, run_id=run.run_id)
            else:
                exp = client.create_experiment(name=experiment, namespace=namespace)
                recurring_run = client.create_recurring_run(
                    experiment_id=exp.experiment_id,
                    job_name=name,
                    cron_expression=cron,
                    params=arguments or {},
                    pipeline_package_path=str(package),
                    pipeline_root=pipeline_root or None,
                    service_account=service_account or None,
                    no_catchup=True,
                )
                result = SubmitResult(
                    host=host, experiment_id=exp.experiment_id, recurring_run_id=recurring_run.recurring_run_id, cron=cron
                )
    except kfp_server_api.ApiException as exc:
        body = (exc.body or "").strip().replace("\n", " ")[:300]
        raise SubmitError(f"KFP API at {host} refused the request: HTTP {exc.status} {exc.reason}: {body}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise SubmitError(f"KFP endpoint {host} failed during submission: {exc}") from None
    log.info("pipeline.submit", **result.model_dump(exclude_none=True))
    return result
