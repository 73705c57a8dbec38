"""No identifier survives ingestion: a PACS-style export named by patient, accession number and date,
ingested and versioned through the CLI, then every output file and every log line scanned."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import TEST_DEID_KEY
from dicom_factory import make_dataset, ramp, write
from phi_scanner import collect_secrets, report, scan, scan_text

from xrayops.data.manifest import read_manifest
from xrayops.data.source_map import read_source_map
from xrayops.dicom.deid import source_pseudonym

# Technical values of the test files that look like names but are not identifiers.
ALLOW = {"ACME Radiography"}
PATIENTS = {  # folder per patient, per accession number; files named PATIENTID_ACCESSION_n
    ("DOE^JANE", "PAT987654", "19700101", "ACC12345678"): ["HAND", "KNEE"],
    ("ROE^RICHARD^QUENTIN", "PAT555123", "19811224", "ACC99887766"): ["SKULL"],
}


def write_pacs_export(root: Path) -> list[Path]:
    """Files whose tags, private tags, overlay comments and paths all carry PHI (and a bad file)."""
    written = []
    for (name, pid, birth, accession), parts in PATIENTS.items():
        folder = root / f"{name.replace('^', '_')}_{birth}" / accession
        for n, part in enumerate(parts, start=1):
            ds = make_dataset(ramp(60 + 4 * len(written), 52), body_part=part, patient_id=pid, PatientName=name,
                              PatientBirthDate=birth, AccessionNumber=accession,
                              StudyDescription=f"Roentgen {part.title()} {name.replace('^', ' ')}",
                              SeriesDescription=f"{part} {pid}", ProtocolName=f"{part} protocol {accession}",
                              InstitutionName="Klinikum Geheimstadt", StationName="XRAYROOM7",
                              DeviceSerialNumber="SN-4711-0815", PerformingPhysicianName="Arzt^Anna",
                              BurnedInAnnotation="NO")  # fmt: skip
            ds.add_new(0x00091010, "LO", f"private {name} {pid}")  # a vendor's private tag
            ds.add_new(0x60004000, "LT", f"overlay comment {name}")  # overlay group (60xx)
            path = folder / f"{pid}_{accession}_{n}.dcm"
            write(path, ds)
            written.append(path)
    bad = root / "DOE_JANE_19700101" / "ACC12345678" / "PAT987654_ACC12345678_9.dcm"
    bad.write_bytes(b"not a dicom file, but named like one\n" * 20)  # quarantined under its pseudonym
    written.append(bad)
    return written


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrayops.app.cli", "--log-json", "--log-level", "DEBUG", *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_pacs_export_with_phi_in_names_and_tags_leaves_no_trace(tmp_path, git_repo):
    export = tmp_path / "export"
    files = write_pacs_export(export)
    secrets = collect_secrets(files, export)
    kinds = {s.kind for s in secrets}
    assert {"name", "name_part", "date", "uid", "path", "path_token", "tag:PatientID", "tag:AccessionNumber",
            "tag:InstitutionName", "tag:StationName", "tag:DeviceSerialNumber", "tag:StudyDescription"} <= kinds
    assert {s.value for s in secrets} >= {"JANE", "1970-01-01", "PAT987654_ACC12345678_1", "ACC12345678"}

    env = {**os.environ, "XRAYOPS_DEID_KEY": TEST_DEID_KEY, "XRAYOPS_PROGRESS": "0", "COLUMNS": "300"}
    data_dir, source_map = git_repo / "data", tmp_path / "private" / "source-map.csv"
    ingested = run_cli("ingest", str(export), "--data-dir", str(data_dir), "--size", "16",
                       "--contact-sheet", str(git_repo / "sheet.png"), "--source-map", str(source_map), env=env)
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    versioned = run_cli("version-dataset", "--data-dir", str(data_dir), "--repo", str(git_repo),
                        "--remote", str(tmp_path / "dvc-remote"), env=env)  # fmt: skip
    assert versioned.returncode == 0, versioned.stderr[-2000:]

    frame = read_manifest(data_dir / "manifest.parquet")
    assert (frame.status == "ok").sum() == 3 and len(frame) == 4  # the bad file is a row too
    assert set(frame[frame.status == "ok"].region) == {"hand", "knee", "skull"}
    assert frame.source_name.str.fullmatch(r"src-[0-9a-f]{16}\.dcm").all()
    ok = frame[frame.status == "ok"]
    assert ok.pixel_sha256.str.fullmatch(r"[0-9a-f]{64}").all() and ok.source_sha256.str.fullmatch(r"[0-9a-f]{64}").all()
    # the operator's way back to a file: the map, PHI by design, owner-only, outside the dataset
    mapping = read_source_map(source_map)
    assert mapping == {source_pseudonym(p.relative_to(export).as_posix(), TEST_DEID_KEY): p.relative_to(export).as_posix()
                       for p in files}  # fmt: skip
    assert source_map.stat().st_mode & 0o777 == 0o600

    outputs = [git_repo / "data", git_repo / ".data.ingest-journal", git_repo / "data.dvc", git_repo / ".dvc",
               git_repo / "sheet.png", tmp_path / "dvc-remote"]  # fmt: skip
    assert all(p.exists() for p in outputs), [p for p in outputs if not p.exists()]
    hits = scan(outputs, secrets, ALLOW)
    logs = ingested.stdout + ingested.stderr + versioned.stdout + versioned.stderr
    assert '"event": "ingest.quarantined"' in logs or '"event":"ingest.quarantined"' in logs.replace(" ", "")
    hits += scan_text("cli output and logs", logs, secrets, ALLOW)
    assert not hits, report(hits)
    # the scanner does find what it looks for (a control, not a tautology)
    (tmp_path / "leak.txt").write_text("file=DOE_JANE_19700101/ACC12345678 born 1970-01-01")
    assert {h.kind for h in scan([tmp_path / "leak.txt"], secrets)} >= {"path", "date", "path_token"}
    pd.DataFrame({"source_name": ["PAT987654_ACC12345678_1.dcm"]}).to_parquet(tmp_path / "leak.parquet")
    assert any(h.location == "source_name[0]" for h in scan([tmp_path / "leak.parquet"], secrets))


def test_quarantine_list_and_unmapped_report_hold_pseudonyms_and_codes_only(tmp_path):
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest

    export = tmp_path / "export"
    files = write_pacs_export(export)
    summary = ingest(export, tmp_path / "data", PreprocessingSpec(size=16), TEST_DEID_KEY)
    table = pd.read_csv(summary.quarantine_path, keep_default_na=False)
    assert table.source_name.str.fullmatch(r"src-[0-9a-f]{16}\.dcm").all() and len(table) == 1
    hits = scan([tmp_path / "data"], collect_secrets(files, export), ALLOW)
    assert not hits, report(hits)
    assert np.load(summary.shards_dir / "shard-00000.npy").shape[0] == 3
