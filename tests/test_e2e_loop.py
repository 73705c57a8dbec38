"""The whole loop at tiny scale, with the real components: DVC on moto's S3, MLflow sqlite,
kserve ModelServer on 127.0.0.1 fed by kserve's REST client, Evidently, kfp.local."""
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pandas as pd
import pytest

from xrayops.config import Settings
from xrayops.data.truth import read_truth_table
from xrayops.app.demo import DemoConfig, run_demo
from xrayops.regions import REGIONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(tmp_path_factory, request):
    # Module-scoped, so it builds its own S3 server and repo rather than the function fixtures.
    from tests.conftest import free_port, stop_process, wait_for_port

    root = tmp_path_factory.mktemp("e2e")
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        wait_for_port(port, moto)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="xrayops")
        settings = Settings(
            data_dir=repo / "data",
            dvc_remote_url="s3://xrayops/dvc",
            s3_endpoint_url=endpoint,
            deid_key="e2e-test-key-not-secret",
        )
        cfg = DemoConfig(
            out=root / "out", repo_dir=repo, n=420, n_shifted=60, synth_size=96, image_size=48,
            pretrain_epochs=3, batch_size=64, finetune_epochs=60, workers=1, run_pipeline=False,
        )
        summary = run_demo(cfg, settings)
        yield summary, cfg, settings, endpoint
    finally:
        stop_process(moto)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_dataset_is_versioned_on_s3(loop):
    summary, cfg, settings, endpoint = loop
    md5 = summary.step("version").facts["md5"]
    dvc_file = cfg.repo_dir / "data.dvc"
    assert md5 in dvc_file.read_text()
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="xrayops")["Contents"]]
    assert any(md5.removesuffix(".dir")[2:] in k for k in keys)
    manifest = pd.read_parquet(settings.data_dir / "manifest.parquet")
    assert len(manifest) == cfg.n  # nothing dropped: every file has a row


def test_model_beats_chance_on_held_out_data(loop):
    summary, *_ = loop
    metrics = json.loads((summary.out / "evaluation" / "metrics.json").read_text())
    chance = 1 / len(REGIONS)
    assert metrics["accuracy"] > 2.5 * chance
    assert metrics["truth_accuracy"] > 2.5 * chance


def test_training_tags_are_audited_and_a_worklist_written(loop):
    summary, cfg, settings, _ = loop
    facts = summary.step("audit").facts
    scores = pd.read_parquet(summary.out / "label-audit" / "label_scores.parquet")
    assert facts["audited"] == len(scores) > 0 and facts["flagged"] == int(scores["is_issue"].sum())
    # synth wrote 5 % wrong tags; the ones among the audited train/val images are counted against the truth.
    truth = read_truth_table(summary.step("synth").artefacts["train_truth"], settings.deid_key.get_secret_value())
    truth = truth.set_index("file")["true_region"]  # keyed by the manifest's source_name pseudonyms
    wrong = scores["source_name"].map(truth).astype(str) != scores["given_region"].astype(str)
    assert facts["wrong_tags"] == int(wrong.sum()) and 0 < facts["wrong_tags"] < 0.15 * len(scores)
    hits = int((wrong & scores["is_issue"]).sum())
    assert facts["recall"] == pytest.approx(hits / wrong.sum(), abs=1e-3)
    assert facts["precision"] == (pytest.approx(hits / facts["flagged"], abs=1e-3) if facts["flagged"] else None)
    page = Path(summary.step("audit").artefacts["worklist"]).read_text()
    assert page.count("data:image/png;base64,") == min(facts["flagged"], 200)


def test_registered_with_lineage(loop):
    summary, cfg, settings, _ = loop
    import mlflow

    client = mlflow.MlflowClient(settings.model_copy(update={"output_dir": summary.out}).tracking_uri())
    version = client.get_model_version_by_alias(settings.registered_model_name, "champion")
    run = client.get_run(version.run_id)
    assert run.data.tags["xrayops.dataset_md5"] == summary.step("version").facts["md5"]
    assert run.data.metrics["accuracy"] == pytest.approx(
        json.loads((summary.out / "evaluation" / "metrics.json").read_text())["accuracy"]
    )


def test_the_champion_is_served_from_a_release(loop):
    """register -> release -> serve, as on a cluster: the served folders are the release's, pinned to
    the champion's version, and the repository's InferenceService manifest is rolled to it."""
    import yaml

    from xrayops.release.plan import ANNOTATION_RELEASE

    summary, cfg, settings, _ = loop
    facts, artefacts = summary.step("release").facts, summary.step("release").artefacts
    version = summary.step("register").facts["version"]
    assert facts["members"] == {"simclr": f"models:/{settings.registered_model_name}/{version}"}
    release = json.loads((Path(artefacts["release"]) / "release.json").read_text())
    assert release["release_id"] == facts["release_id"] and Path(artefacts["release"]).name == facts["release_id"]
    served = summary.step("serve").artefacts["served_bundles"]
    assert served == str(Path(artefacts["release"]) / "simclr")
    weights = (Path(served) / "weights.pt").read_bytes()
    assert weights == (summary.out / "bundle" / "weights.pt").read_bytes()  # what finetune wrote, bit for bit
    isvc = yaml.safe_load(Path(artefacts["inference_service"]).read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == artefacts["release"]
    assert isvc["spec"]["predictor"]["model"]["args"] == ["--bundle=/mnt/models/simclr"]
    assert isvc["metadata"]["annotations"][ANNOTATION_RELEASE] == facts["release_id"]


def test_served_predictions_and_inference_log(loop):
    summary, cfg, *_ = loop
    facts = summary.step("serve").facts
    assert facts["requests"] == cfg.n_shifted
    assert facts["example"]["region"] in REGIONS
    assert facts["served_accuracy_vs_truth"] > 1.5 / len(REGIONS)
    log = pd.read_parquet(summary.out / "inference-log")
    assert len(log) == cfg.n_shifted
    assert set(log["region"]) <= set(REGIONS)


def test_shifted_batch_triggers_retraining(loop):
    summary, *_ = loop
    facts = summary.step("monitor").facts
    assert facts["retrain"] is True
    assert facts["drift_share"] > 0
    assert (summary.out / "monitor" / "monitor.json").exists()
    # The window is a snapshot in the demo's Evidently workspace (what `xrayops dashboard` shows).
    workspace = Path(summary.step("monitor").artefacts["evidently_workspace"])
    assert facts["snapshot"] and any(workspace.rglob(f"*{facts['snapshot']}*"))


def test_no_identifier_of_the_synthetic_export_survives_the_loop(loop):
    """synth writes fake PHI into every identifying tag and names files img-NNNNNN; not one value
    reaches the dataset, DVC, MLflow, the audit worklist, the evaluation, the release, the served
    inference log or the Evidently workspace (the synthetic export itself is the input, skipped)."""
    import evidently
    from phi_scanner import collect_secrets, description_vocabulary, library_text, report, scan

    summary, cfg, settings, _ = loop
    exports = [Path(summary.step("synth").artefacts[k]) for k in ("train_dicom", "shifted_dicom")]
    files = sorted(f for d in exports for f in d.rglob("*.dcm"))
    secrets = {s for d in exports for s in collect_secrets(sorted(d.rglob("*.dcm")), d)}
    assert any(s.kind == "name" for s in secrets) and any(s.kind == "tag:AccessionNumber" for s in secrets)
    outputs = [p for p in summary.out.iterdir() if p.name != "synth"]
    outputs += [settings.data_dir, cfg.repo_dir / "data.dvc", cfg.repo_dir / ".dvc"]
    # synth numbers its files img-NNNNNN: the counters alone are no identifier (a whole stem is one,
    # and stays searched), and "000000" is also a colour in every report
    counters = {s.value for s in secrets if s.kind == "path_token" and s.value.isdigit()}
    hits = scan(outputs, secrets, allow=description_vocabulary(files) | counters,
                library=library_text([Path(evidently.__file__).parent]))
    assert not hits, report(hits)
