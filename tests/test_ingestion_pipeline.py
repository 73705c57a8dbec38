"""The ingestion fan-out: batches merged equal a serial run; the KFP graph (YAML and kfp.local)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TEST_DEID_KEY
from dicom_factory import make_dataset, ramp, write

from xrayops.contracts import PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.data.merge import merge_datasets
from xrayops.data.shards import load_shards
from xrayops.dicom.deid import source_pseudonym
from xrayops.ingest import ingest, plan_parts

KEY = "fanout-test-key"
SPEC = PreprocessingSpec(size=16)
LOCATION = ["shard", "shard_index"]


@pytest.fixture
def export(tmp_path):
    """Seven files; a copy of a.dcm (same SOP UID) and of b.dcm's pixels sit in later batches."""
    root = tmp_path / "export"
    first = make_dataset(ramp(48, 40), body_part="HAND", patient_id="P1")
    write(root / "a.dcm", first)
    write(root / "b.dcm", make_dataset(ramp(50, 40), body_part="Knie", patient_id="P2"))
    write(root / "c.dcm", make_dataset(ramp(52, 40), body_part="ZZZ", patient_id="P3"))
    (root / "d.dcm").write_text("not dicom\n" * 40)
    write(root / "e.dcm", make_dataset(ramp(54, 40), body_part="HAND", sop_uid=first.SOPInstanceUID))
    write(root / "f.dcm", make_dataset(ramp(50, 40), body_part="Knie", patient_id="P2"))  # b's pixels
    write(root / "g.dcm", make_dataset(ramp(56, 40), body_part="Schulter", patient_id="P4"))
    return root


def pixels_by_name(data_dir) -> dict[str, np.ndarray]:
    frame = read_manifest(data_dir / "manifest.parquet")
    shards = load_shards(data_dir)
    return {r.source_name: np.asarray(shards[r.shard][r.shard_index]) for r in frame[frame.status == "ok"].itertuples()}


def test_merged_batches_equal_a_serial_run(export, tmp_path):
    serial = ingest(export, tmp_path / "serial", SPEC, KEY)
    n_files, n_parts = plan_parts(export, files_per_part=3)
    assert (n_files, n_parts) == (7, 3)
    parts = [tmp_path / f"part{i}" for i in range(n_parts)]
    for i, part in enumerate(parts):
        ingest(export, part, SPEC, KEY, part=(i, n_parts))
    # each batch alone cannot see the duplicates of earlier batches
    alone = read_manifest(parts[1] / "manifest.parquet").set_index("source_name")
    e = source_pseudonym("e.dcm", KEY)
    assert sorted(alone.index) == sorted(source_pseudonym(n, KEY) for n in ("c.dcm", "d.dcm", "e.dcm"))
    assert alone.loc[e, "status"] == "ok"
    merged = merge_datasets(parts, tmp_path / "merged")

    one, two = read_manifest(serial.manifest_path), read_manifest(merged.manifest_path)
    pd.testing.assert_frame_equal(one.drop(columns=LOCATION), two.drop(columns=LOCATION))
    assert merged.reasons == serial.reasons == {"duplicate_pixels": 1, "duplicate_sop_instance_uid": 1, "not_dicom": 1}
    assert (merged.n_files, merged.n_ok, merged.regions, merged.splits) == (
        serial.n_files, serial.n_ok, serial.regions, serial.splits)  # fmt: skip
    a, b = pixels_by_name(tmp_path / "serial"), pixels_by_name(tmp_path / "merged")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert sorted(p.name for p in (tmp_path / "merged" / "shards").iterdir()) == [
        "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]  # fmt: skip
    for table in ("quarantine.csv", "unmapped_body_parts.csv", "preprocessing.json"):
        assert (tmp_path / "serial" / table).read_text() == (tmp_path / "merged" / table).read_text(), table


def test_merge_refuses_batches_with_different_specs(export, tmp_path):
    ingest(export, tmp_path / "p0", SPEC, KEY, part=(0, 2))
    ingest(export, tmp_path / "p1", PreprocessingSpec(size=8), KEY, part=(1, 2))
    with pytest.raises(ValueError, match="different preprocessing specs"):
        merge_datasets([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")


def test_compiled_ingestion_pipeline_fans_out_with_parallel_for(tmp_path):
    from pipelines.ingestion import SOURCE_MOUNT, compile_ingestion

    path = compile_ingestion(tmp_path / "ingestion.yaml", cluster=True, source_pvc="dicom-landing", parallelism=8)
    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-ingest-op-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in body.values()} == {"ingest-part"}
    (part,) = body.values()
    for name in ("part_index", "n_parts"):  # fields of the plan's items
        assert part["inputs"]["parameters"][name]["parameterExpressionSelector"] == f"parseJson(string_value)[\"{name}\"]"
    assert part["cachingOptions"] == {}  # a changed folder under the same path is never served from cache
    merge = tasks["merge-ingest-op"]
    assert merge["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"] == loop["taskInfo"]["name"]
    assert tasks["version-dataset-op"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "merge-ingest-op"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-plan-ingest-op", "exec-ingest-part-op"):
        assert executors[name]["pvcMount"][0]["mountPath"] == SOURCE_MOUNT
    with_key = {n for n, e in executors.items() if any(s["secretName"] == "xrayops-deid" for s in e.get("secretAsEnv", []))}
    assert with_key == {"exec-ingest-part-op"}  # only the pods that pseudonymise get the key


@pytest.mark.slow
def test_kfp_local_ingestion_fans_out_and_merges(export, tmp_path):
    """The same graph run by kfp.local's SubprocessRunner: 3 batch tasks, one merged dataset."""
    from pipelines.ingestion import run_ingestion_local

    task = run_ingestion_local(tmp_path / "kfp", source_dir=str(export), files_per_batch=3, image_size=16, workers=1)
    merged_dir = task.output.path
    serial = ingest(export, tmp_path / "serial", SPEC, TEST_DEID_KEY)  # the tasks' key (conftest's environment)
    one, two = read_manifest(serial.manifest_path), read_manifest(f"{merged_dir}/manifest.parquet")
    pd.testing.assert_frame_equal(one.drop(columns=LOCATION), two.drop(columns=LOCATION))
    assert task.output.metadata["n_parts"] == 3
    (run,) = list((tmp_path / "kfp").iterdir())
    assert sum(1 for p in run.rglob("executor_output.json") if "ingest-part" in str(p)) == 3
