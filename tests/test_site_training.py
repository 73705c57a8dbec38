"""The site-training pipeline: a site's archive -> paper 000's ensemble, one registered model per
SSL method, evaluated together, released as one serving release. Compiled YAML and a kfp.local run."""
from __future__ import annotations

import json

import pytest
import yaml

from pipelines.gpu_pool import GpuPool
from pipelines.site_training import ENSEMBLE_METHODS, compile_site_training
from tests.test_release import BASE_ISVC


def _tasks(dag: dict) -> dict[str, dict]:
    return {t["taskInfo"]["name"]: t for t in dag["tasks"].values()}


def test_compiled_graph_trains_one_member_per_method_and_evaluates_them_together(tmp_path):
    docs = list(yaml.safe_load_all(compile_site_training(
        tmp_path / "s.yaml", gpu=True, cluster=True, source_pvc="xrayops-dicom",
        gpu_pool=GpuPool(accelerator_limit=1, node_selector={"pool": "h100"}),
    ).read_text()))
    spec, platform = docs[0], docs[1]
    root = _tasks(spec["root"]["dag"])
    assert set(root) == {"no-champions", "ingestion", "version", "members", "evaluate-ensemble", "release-enabled"}
    # the alias check runs before anything else: no GPU hours are spent on a run that would be refused
    assert root["ingestion"]["dependentTasks"] == ["no-champions-op"]
    assert spec["root"]["inputDefinitions"]["parameters"]["replace_champions"]["defaultValue"] is False
    assert spec["root"]["inputDefinitions"]["parameters"]["ssl_methods"]["defaultValue"] == ENSEMBLE_METHODS
    assert root["members"]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--ssl_methods"
    members = _tasks(spec["components"][root["members"]["componentRef"]["name"]]["dag"])
    assert set(members) == {"pretrain", "finetune", "evaluate", "register"}
    loop_item = "pipelinechannel--ssl_methods-loop-item"
    assert members["pretrain"]["inputs"]["parameters"]["method"]["componentInputParameter"] == loop_item
    # one registered model per member: NAME-METHOD, so retraining and release treat members apart
    assert members["register"]["inputs"]["parameters"]["name_suffix"]["componentInputParameter"] == loop_item
    # the dataset version reaches each member as the version step's artifact (lineage: its md5)
    for task in ("finetune", "register"):
        version = members[task]["inputs"]["artifacts"]["dataset_version"]
        assert version == {"componentInputArtifact": "pipelinechannel--version-dataset-op-dvc_file"}
    # every member's bundle goes to the ensemble evaluation; every registered version to the release
    ensemble = root["evaluate-ensemble"]["inputs"]["artifacts"]["bundles"]
    loop_id = next(k for k, t in spec["root"]["dag"]["tasks"].items() if t["taskInfo"]["name"] == "members")
    assert ensemble["taskOutputArtifact"] == {"outputArtifactKey": "pipelinechannel--finetune-op-bundle",
                                              "producerTask": loop_id}
    assert root["release-enabled"]["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--release'] == true"
    assert spec["root"]["inputDefinitions"]["parameters"]["release"]["defaultValue"] is False
    executors = spec["deploymentSpec"]["executors"]
    gpu = {n for n, e in executors.items() if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"exec-pretrain-op", "exec-finetune-op"}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-pretrain-op"]["nodeSelector"]["labels"] == {"pool": "h100"}
    assert {"exec-register-op", "exec-evaluate-ensemble-op", "exec-release-op"} <= {
        n for n, e in k8s.items() if e.get("configMapAsEnv")}


def test_cli_compiles_the_site_training_pipeline(tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    out = tmp_path / "site.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile-site-training", "--out", str(out), "--cluster",
                                      "--source-pvc", "xrayops-dicom", "--gpu"])
    assert result.exit_code == 0, result.output
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "xrayops-site-training"


@pytest.mark.slow
def test_kfp_local_trains_registers_evaluates_and_releases_the_ensemble(tmp_path, monkeypatch):
    import mlflow

    from pipelines.site_training import run_site_training_local
    from xrayops.data.synth import synthesize

    monkeypatch.setenv("XRAYOPS_PROGRESS", "0")
    archive = tmp_path / "archive"
    synthesize(archive / "batch1", n=160, seed=11, size=64, ood_rate=0.0, workers=1)
    (archive / "batch1" / "truth.csv").unlink()  # a PACS archive has no truth
    manifest, serving = tmp_path / "inferenceservice.yaml", tmp_path / "serving"
    manifest.write_text(BASE_ISVC.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "kfp"
    task = run_site_training_local(
        root, source_dir=str(archive), files_per_batch=100, ingest_workers=1, image_size=32,
        ssl_methods=["simclr", "supcon"], pretrain_epochs=1, batch_size=64, finetune_epochs=3,
        dvc_remote_url=str(tmp_path / "remote"), mlflow_tracking_uri=uri, model_name="site",
        release=True, release_storage_uri=str(serving), inference_service_manifest=str(manifest),
    )
    (run,) = list(root.iterdir())
    client = mlflow.MlflowClient(uri)
    versions = {m: client.get_model_version_by_alias(f"site-{m}", "champion") for m in ("simclr", "supcon")}
    md5 = json.loads(next(run.rglob("version-dataset-op/executor_output.json")).read_text())["parameterValues"]["md5"]
    for method, version in versions.items():
        run_tags = client.get_run(version.run_id).data
        assert run_tags.tags["xrayops.dataset_md5"] == md5 and run_tags.params["ssl_method"] == method

    # The ensemble was scored beside its members on the test split, and its accuracy is the run's output.
    report = next(run.rglob("evaluate-ensemble-op/report"))
    metrics = json.loads(next(run.rglob("evaluate-ensemble-op/evaluation/metrics.json")).read_text())
    assert {k.split(":")[0] for k in metrics["members"]} == {"simclr", "supcon"}
    assert task.output == pytest.approx(metrics["accuracy"]) and 0.0 <= task.output <= 1.0
    assert "Ensemble and members" in report.read_text()

    # Both members released together; the manifest's predictor loads both.
    release = json.loads(next(run.rglob("release-op/release")).read_text())
    assert {m["member"]: m["model_uri"] for m in release["members"]} == {
        m: f"models:/site-{m}/{v.version}" for m, v in versions.items()}
    rolled = yaml.safe_load(next(run.rglob("release-op/rendered")).read_text())
    assert rolled["spec"]["predictor"]["model"]["args"] == ["--bundle=/mnt/models/simclr", "--bundle=/mnt/models/supcon"]
    assert (serving / "releases" / release["release_id"] / "release.json").is_file()


def test_site_train_cli_refuses_before_starting(tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    runner = CliRunner()
    root = tmp_path / "kfp"

    def said(*args) -> tuple[int, str]:
        res = runner.invoke(app, ["pipeline", "site-train", "--root", str(root), *args])
        return res.exit_code, " ".join(res.output.split())

    code, out = said("--source-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a folder" in out
    (tmp_path / "archive").mkdir()
    code, out = said("--source-dir", str(tmp_path / "archive"), "--method", "mae")
    assert code == 2 and "unknown SSL method 'mae'" in out and "simclr, byol, supcon" in out
    code, out = said("--source-dir", str(tmp_path / "archive"), "--release-manifest", str(tmp_path / "isvc.yaml"))
    assert code == 2 and "not found" in out
    assert not root.exists()  # nothing was started


def test_a_site_training_does_not_replace_champions_unless_told(tmp_path, monkeypatch):
    """Members that already have a champion are retrained (gated), not overwritten by a new site training:
    the pipeline's first step and the local CLI both refuse, before any work."""
    from typer.testing import CliRunner

    from components import no_champions_op
    from tests.test_registry import write_dummy_bundle
    from xrayops.app.cli import app
    from xrayops.registry import held_aliases, register_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_dummy_bundle(tmp_path / "b", b"weights")
    register_bundle(tmp_path / "b", uri, "site-byol", alias="champion")
    register_bundle(tmp_path / "b", uri, "site-simclr", alias="challenger")
    assert held_aliases(uri, ["site-simclr", "site-byol", "site-supcon"], "champion") == {"site-byol": 1}

    check = no_champions_op.python_func
    with pytest.raises(RuntimeError, match=r"alias 'champion' is already held by site-byol \(version 1\)"):
        check(tracking_uri=uri, model_name="site", ssl_methods=["simclr", "byol"], alias="champion", replace=False)
    assert check(tracking_uri=uri, model_name="site", ssl_methods=["simclr", "byol"], alias="champion",
                 replace=True) == "site-byol"
    assert check(tracking_uri=uri, model_name="site", ssl_methods=["simclr", "supcon"], alias="champion",
                 replace=False) == "none"

    monkeypatch.setenv("XRAYOPS_MLFLOW_TRACKING_URI", uri)
    (tmp_path / "archive").mkdir()
    res = CliRunner().invoke(app, ["pipeline", "site-train", "--source-dir", str(tmp_path / "archive"),
                                   "--root", str(tmp_path / "kfp"), "--model-name", "site"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "site-byol already have a champion" in out and "--replace-champions" in out
    assert not (tmp_path / "kfp").exists()
