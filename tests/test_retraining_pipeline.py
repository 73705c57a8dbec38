"""The retraining pipeline: the site's DICOM archive -> new DVC version -> challenger on the
champion's backbone -> gate -> alias. Compiled YAML (what a cluster runs) and a kfp.local run."""
from __future__ import annotations

import json

import pytest
from conftest import TEST_DEID_KEY
import torch
import yaml

from pipelines.gpu_pool import GpuPool
from pipelines.retraining import compile_retraining
from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
from xrayops.release import release_models
from xrayops.release.manifest import write_manifest
from tests.test_release import BASE_ISVC

STAGES = {"ingestion", "version", "champion", "pretrain", "finetune", "evaluate", "register", "gate", "change-record",
          "audit-labels", "release-enabled"}  # the condition around the optional release step


def _tasks(spec: dict) -> dict[str, dict]:
    return {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}


def test_compiled_retraining_graph_starts_from_the_champion_and_gates(tmp_path):
    docs = list(yaml.safe_load_all(compile_retraining(
        tmp_path / "r.yaml", gpu=True, cluster=True, source_pvc="xrayops-dicom",
        gpu_pool=GpuPool(accelerator_limit=2, node_selector={"pool": "a100"}),
    ).read_text()))
    spec, platform = docs[0], docs[1]
    tasks = _tasks(spec)
    assert set(tasks) == STAGES
    # The challenger starts from the champion's backbone, with the champion's method and arch.
    pretrain = tasks["pretrain"]["inputs"]
    assert pretrain["artifacts"]["init_from"]["taskOutputArtifact"] == {"outputArtifactKey": "backbone", "producerTask": "champion-op"}
    assert pretrain["parameters"]["method"]["taskOutputParameter"]["outputParameterKey"] == "ssl_method"
    assert pretrain["parameters"]["epochs"]["componentInputParameter"] == "pretrain_epochs"
    assert spec["root"]["inputDefinitions"]["parameters"]["pretrain_epochs"]["defaultValue"] == 0.0
    # Both models are gated on the test split of the version this run pushed.
    gate = tasks["gate"]["inputs"]
    assert gate["parameters"]["test_set"]["taskOutputParameter"]["producerTask"] == "version-dataset-op"
    assert gate["artifacts"]["champion"]["taskOutputArtifact"]["producerTask"] == "champion-op"
    assert gate["artifacts"]["challenger"]["taskOutputArtifact"]["producerTask"] == "finetune-op"
    assert gate["parameters"]["challenger_uri"]["taskOutputParameter"]["producerTask"] == "register-op"
    assert tasks["register"]["inputs"]["parameters"]["alias"]["runtimeValue"]["constant"] == "challenger"
    # A moved alias must be seen: neither the champion lookup nor the gate is cached.
    assert tasks["champion"]["cachingOptions"] == {} and tasks["gate"]["cachingOptions"] == {}
    # The change record takes the gate's decision and both models; the release waits for it.
    record = tasks["change-record"]["inputs"]
    assert record["artifacts"]["decision"]["taskOutputArtifact"] == {"outputArtifactKey": "decision", "producerTask": "gate-op"}
    assert record["artifacts"]["challenger"]["taskOutputArtifact"]["producerTask"] == "finetune-op"
    assert record["parameters"]["challenger_uri"]["taskOutputParameter"]["producerTask"] == "register-op"
    assert tasks["change-record"]["cachingOptions"] == {}
    assert tasks["finetune"]["cachingOptions"] == {"enableCache": True}
    # GPU pool on pretrain and finetune only; the archive volume on the ingestion tasks.
    executors = spec["deploymentSpec"]["executors"]
    gpu = {n for n, e in executors.items() if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"exec-pretrain-op", "exec-finetune-op"}
    assert executors["exec-pretrain-op"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-pretrain-op"]["nodeSelector"]["labels"] == {"pool": "a100"}
    mounts = {n for n, e in k8s.items() if any(p.get("constant") == "xrayops-dicom" for p in
                                                [v.get("pvcNameParameter", {}).get("runtimeValue", {}) for v in e.get("pvcMount", [])])}
    assert mounts == {"exec-plan-ingest-op", "exec-ingest-part-op"}
    # Cluster settings everywhere; the de-identification key only where DICOM is read.
    deid = {n for n, e in k8s.items() if any(s.get("secretName") == "xrayops-deid" or
                                             s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant") == "xrayops-deid"
                                             for s in e.get("secretAsEnv", []))}
    assert deid == {"exec-ingest-part-op"}
    assert {"exec-gate-op", "exec-champion-op", "exec-register-op", "exec-release-op"} <= {
        n for n, e in k8s.items() if e.get("configMapAsEnv")}
    # The release runs only for a promoted challenger, and only when the run asks for it (off by default).
    enabled = tasks["release-enabled"]
    assert enabled["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--release'] == true"
    assert spec["root"]["inputDefinitions"]["parameters"]["release"]["defaultValue"] is False
    (promoted,) = spec["components"][enabled["componentRef"]["name"]]["dag"]["tasks"].values()
    assert promoted["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-op-promoted'] == true"
    (release,) = spec["components"][promoted["componentRef"]["name"]]["dag"]["tasks"].values()
    assert release["taskInfo"]["name"] == "release"
    assert "change-record-op" in enabled["dependentTasks"]  # released only after the record is written
    assert release["inputs"]["parameters"]["model_uris"]["runtimeValue"]["constant"] == [
        "{{$.inputs.parameters['pipelinechannel--register-op-Output']}}"]  # the registered challenger
    # ...and reads where to publish and which service to roll from the cluster's ConfigMap.
    keys = {m["configMapKey"] for m in k8s["exec-release-op"]["configMapAsEnv"][0]["keyToEnv"]}
    assert {"XRAYOPS_RELEASE_STORAGE_URI", "XRAYOPS_INFERENCE_SERVICE", "XRAYOPS_SERVING_NAMESPACE"} <= keys
    # ...and whether a person must approve first (true on the cluster overlays), as the change record does.
    for step in ("exec-release-op", "exec-change-record-op", "exec-gate-op"):
        keys = {m["configMapKey"] for c in k8s[step]["configMapAsEnv"] for m in c["keyToEnv"]}
        assert {"XRAYOPS_RELEASE_REQUIRES_APPROVAL", "XRAYOPS_GATE_SUBGROUP_MIN_N"} <= keys, step


def test_retrain_cli_compiles_the_retraining_pipeline(tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    out = tmp_path / "retrain.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile-retraining", "--out", str(out), "--cluster",
                                      "--source-pvc", "xrayops-dicom"])
    assert result.exit_code == 0, result.output
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "xrayops-retraining" and set(_tasks(spec)) == STAGES


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """A synthetic export (batch v1), its ingested dataset and a champion registered in MLflow."""
    from xrayops.bundle import export_backbone
    from xrayops.data.synth import synthesize
    from xrayops.ingest import ingest
    from xrayops.models.backbone import build_backbone, save_backbone
    from xrayops.registry import register_bundle
    from xrayops.train.finetune import FinetuneConfig, finetune

    monkeypatch.setenv("XRAYOPS_PROGRESS", "0")
    archive = tmp_path / "archive"
    synthesize(archive / "v1", n=160, seed=3, size=64, ood_rate=0.0)
    (archive / "v1" / "truth.csv").unlink()  # a PACS archive has no truth
    data = tmp_path / "v1-data"
    ingest(archive, data, PreprocessingSpec(size=32), TEST_DEID_KEY)  # the tasks' key (conftest's environment)
    torch.manual_seed(0)
    backbone = save_backbone(tmp_path / "backbone.pt", build_backbone("resnet18")[0], "resnet18", "simclr")
    bundle = finetune(data, backbone, tmp_path / "champion", FinetuneConfig(epochs=3, seed=0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = register_bundle(bundle, uri, "xrayops-region", alias="champion")
    export_backbone(bundle, tmp_path / "champion-backbone.pt")
    return {"archive": archive, "tracking_uri": uri, "registered": registered, "bundle": bundle,
            "backbone": tmp_path / "champion-backbone.pt", "data": data}


def _review_six_tags(data, feature_repo, monkeypatch) -> None:
    """Reviewers correct six training tags in the Feast store (what `import-reviews` writes)."""
    from datetime import datetime, timedelta, timezone

    import pandas as pd

    from xrayops.config import Settings
    from xrayops.features import open_store, record_reviews
    from xrayops.monitor.review import LabelEvent

    monkeypatch.setenv("XRAYOPS_FEATURE_REPO_DIR", str(feature_repo))  # the pipeline's tasks inherit it
    manifest = pd.read_parquet(data / "manifest.parquet")
    train = manifest[(manifest["status"] == "ok") & (manifest["split"] == "train")].head(6)
    now = datetime.now(timezone.utc)
    events = [LabelEvent(image_id=i, event_timestamp=now - timedelta(minutes=1), source="reviewer", actor="dr-a",
                         decision="relabel", region="skull" if tag != "skull" else "knee")
              for i, tag in zip(train["image_id"], train["region"])]
    assert record_reviews(open_store(Settings()), manifest, events, now - timedelta(hours=1)) == 6


@pytest.mark.slow
def test_kfp_local_retraining_gates_and_promotes_a_challenger_on_the_new_version(champion, tmp_path, monkeypatch):
    import mlflow

    from pipelines.retraining import run_retraining_local
    from xrayops.data.synth import synthesize

    _review_six_tags(champion["data"], tmp_path / "feast", monkeypatch)
    archive = champion["archive"]
    synthesize(archive / "v2", n=80, seed=4, size=64, ood_rate=0.0, shift=1.0)  # a new vendor's batch arrives
    (archive / "v2" / "truth.csv").unlink()
    # The champion is live: released to the serving storage, the InferenceService manifest points at it.
    serving, manifest = tmp_path / "serving", tmp_path / "inferenceservice.yaml"
    live = release_models([yaml.safe_load(BASE_ISVC.read_text())], [champion["registered"].model_uri], str(serving),
                          champion["tracking_uri"])
    write_manifest(live.documents, manifest)
    root = tmp_path / "kfp"
    # The site requires a person's approval before a release serves (as the cluster overlays do).
    monkeypatch.setenv("XRAYOPS_RELEASE_REQUIRES_APPROVAL", "true")
    run_retraining_local(
        root, source_dir=str(archive), files_per_batch=100, ingest_workers=1,
        dvc_remote_url=str(tmp_path / "remote"), mlflow_tracking_uri=champion["tracking_uri"], finetune_epochs=3,
        gate_margin=1.0, gate_bootstrap_samples=200, label_flag_below=0.0, labels_from_store=True,
        release=True, release_storage_uri=str(serving), inference_service_manifest=str(manifest),
    )
    (run,) = list(root.iterdir())
    outputs = {p.parent.name: json.loads(p.read_text()) for p in run.rglob("executor_output.json")}
    assert sum(1 for p in run.rglob("executor_output.json") if "ingest-part-op" in str(p)) == 3  # 240 files, 100 a batch
    md5 = outputs["version-dataset-op"]["parameterValues"]["md5"]
    assert any((tmp_path / "remote").rglob(md5.removesuffix(".dir")[2:] + "*"))
    assert outputs["champion-op"]["parameterValues"]["model_uri"] == "models:/xrayops-region/1"
    assert outputs["register-op"]["parameterValues"]["Output"] == "models:/xrayops-region/2"

    # pretrain_epochs=0: the challenger is a new head on the champion's frozen backbone, bit for bit.
    kept = torch.load(run / "pretrain-op" / "backbone" / "backbone.pt", weights_only=True)["state_dict"]
    before = torch.load(champion["backbone"], weights_only=True)["state_dict"]
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in kept)
    weights = torch.load(run / "finetune-op" / "bundle" / "weights.pt", weights_only=True)
    assert all(torch.equal(weights[f"backbone.{k}"], before[k]) for k in before if not k.endswith("num_batches_tracked"))

    # The challenger trained on the reviewers' corrections, not the six wrong tags.
    assert outputs["finetune-op"]["artifacts"]["bundle"]["artifacts"][0]["metadata"]["relabelled_from_store"] == 6

    decision = json.loads((run / "gate-op" / "decision").read_text())
    assert decision["test_set"] == md5 and decision["n"] > 0 and decision["lost"] == []
    assert decision["champion"] == "models:/xrayops-region/1" and decision["challenger"] == "models:/xrayops-region/2"
    assert decision["promote"] is True and outputs["gate-op"]["parameterValues"]["promoted"] is True
    client = mlflow.MlflowClient(champion["tracking_uri"])
    assert str(client.get_model_version_by_alias("xrayops-region", "champion").version) == "2"
    version = client.get_model_version("xrayops-region", "2")
    assert client.get_run(version.run_id).data.tags["xrayops.dataset_md5"] == md5
    assert version.tags["xrayops.gate.promote"] == "true" and version.tags["xrayops.gate.test_set"] == md5
    # The change record: the gate's decision, the reviewers' six corrections, the approval still open.
    from xrayops.release.change_record import ChangeRecord

    record = ChangeRecord.model_validate_json((run / "change-record-op" / "record_json").read_text())
    assert record.gate.promote and record.challenger.ref == "models:/xrayops-region/2"
    assert record.corrections.by_reason == {"relabel": 6} and record.requires_approval
    assert record.dataset is None and "records no dataset version" in record.dataset_note  # the fixture's champion
    page = (run / "change-record-op" / "record").read_text()
    assert "Change record " + record.record_id in page and "awaiting approval" in page
    assert outputs["change-record-op"]["parameterValues"]["Output"] == record.record_id

    # Promoted, published over the live release, but awaiting approval: the manifest is not rolled.
    released = json.loads((run / "release-op" / "release").read_text())
    assert [m["model_uri"] for m in released["members"]] == ["models:/xrayops-region/2"]
    assert released["previous"] == live.release.release_id != released["release_id"]
    assert outputs["release-op"]["parameterValues"]["release_id"] == released["release_id"]
    assert outputs["release-op"]["parameterValues"]["status"] == "awaiting approval"
    assert (serving / "releases" / released["release_id"] / "release.json").is_file()
    assert yaml.safe_load((run / "release-op" / "rendered").read_text()) == yaml.safe_load(manifest.read_text())
    # A person approves it; publishing again then rolls the manifest to it.
    from xrayops.release import Release
    from xrayops.release.approval import decide

    candidate = Release.model_validate(released)
    decide("approved", candidate, "Dr. Q. Officer", "gate and subgroups read", champion["tracking_uri"],
           tmp_path / "audit.jsonl", change_record=run / "change-record-op" / "record")
    approved = release_models(list(yaml.safe_load_all(manifest.read_text())), ["models:/xrayops-region/2"],
                              str(serving), champion["tracking_uri"], require_approval=True)
    assert approved.release.release_id == released["release_id"]
    rolled = approved.inference_service
    assert rolled["spec"]["predictor"]["model"]["storageUri"] == outputs["release-op"]["parameterValues"]["uri"]
    assert rolled["metadata"]["annotations"]["xrayops.io/release-previous"] == live.release.release_id
    # The new version's tags are audited on the backbone the challenger uses.
    audit = outputs["audit-labels-op"]["artifacts"]["issues"]["artifacts"][0]["metadata"]
    assert audit["n_images"] > 0

    # No identifier of the archive (synthetic PHI in every tag, file names) in any artefact of the
    # run: KFP outputs and metadata, the DVC remote, MLflow, the serving storage, the rolled manifest.
    from phi_scanner import collect_secrets, description_vocabulary, report, scan

    files = sorted(archive.rglob("*.dcm"))
    secrets = collect_secrets(files, archive)
    hits = scan([root, tmp_path / "remote", tmp_path / "mlflow.db", serving, manifest, tmp_path / "feast"], secrets,
                allow=description_vocabulary(files))
    assert not hits, report(hits)


def test_gate_keeps_a_champion_whose_outputs_the_challenger_lacks():
    from xrayops.evaluate.gate import ScoredModel, gate, lost_outputs, refuse

    spec = PreprocessingSpec(size=32)
    champ = ModelBundleMeta(classes=["hand", "knee"], preprocessing=spec, orientation=True, binary_heads=["implant"])
    chall = ModelBundleMeta(classes=["hand"], preprocessing=spec)
    assert lost_outputs(champ, chall) == ["orientation", "binary head implant", "class knee"]
    assert lost_outputs(champ, champ) == [] and lost_outputs(chall, champ) == []
    ids = [f"i{k}" for k in range(40)]
    truth = ["hand"] * 40
    a = ScoredModel(name="a", test_set="m", image_ids=ids, y_true=truth, y_pred=["knee"] * 40)
    b = ScoredModel(name="b", test_set="m", image_ids=ids, y_true=truth, y_pred=truth)
    passed = gate(a, b, samples=200)
    assert passed.promote and passed.lost == []
    kept = refuse(passed, ["orientation"])
    assert not kept.promote and kept.lost == ["orientation"] and "lacks the champion's orientation" in kept.reason
    assert refuse(passed, []) is passed


def test_retrain_cli_refuses_a_missing_archive_or_champion(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XRAYOPS_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}", "XRAYOPS_LOG_LEVEL": "WARNING"}

    def retrain(*args):
        proc = subprocess.run([sys.executable, "-m", "xrayops.app.cli", "pipeline", "retrain", "--root", str(tmp_path / "kfp"),
                               *args], capture_output=True, text=True, env=env, cwd=root)
        return proc.returncode, " ".join(proc.stderr.split())  # rich wraps long lines

    code, err = retrain("--source-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a folder" in err and "Traceback" not in err
    (tmp_path / "archive").mkdir()
    code, err = retrain("--source-dir", str(tmp_path / "archive"), "--release-manifest", str(tmp_path / "isvc.yaml"))
    assert code == 2 and "manifest" in err and "not found" in err and "Traceback" not in err
    code, err = retrain("--source-dir", str(tmp_path / "archive"))
    assert code == 2 and "Traceback" not in err
    assert "models:/xrayops-region@champion" in err and "register a champion first" in err
    assert not (tmp_path / "kfp").exists()  # nothing was started
