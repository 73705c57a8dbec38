"""The synthetic PACS export: valid DICOM, formats, orientation, label noise, shift, PHI, and no shortcuts."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xrayops.data.phantoms import OOD_KINDS, draw_region
from xrayops.data.synth import (
    BODY_PART_VOCABULARY,
    REGION_CODES,
    TRUTH_COLUMNS,
    VENDORS,
    synthesize,
    to_stored,
)
from xrayops.dicom.labels import anatomic_region_codes, code_string, region_from_dataset, to_code_string
from xrayops.regions import REGIONS, UNKNOWN


def _read_truth(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype={"patient_id": str, "tag_text": str})


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixels as [0, 1] with bone bright (undo MONOCHROME1)."""
    a = ds.pixel_array.astype(np.float64) / ((1 << int(ds.BitsStored)) - 1)
    return 1.0 - a if ds.PhotometricInterpretation == "MONOCHROME1" else a


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth60")
    summary = synthesize(out, n=60, seed=3, mislabel_rate=0.2, shift=0.3, ood_rate=0.1, size=64)
    truth = _read_truth(summary.truth_path)
    files = {row.file: pydicom.dcmread(summary.dicom_dir / row.file) for row in truth.itertuples()}
    return summary, truth, files


def test_summary_and_truth_agree(export):
    summary, truth, _ = export
    assert summary.n_files == 60 == len(truth)
    assert tuple(truth.columns) == TRUTH_COLUMNS
    assert sorted(p.name for p in summary.dicom_dir.iterdir()) == sorted(truth.file)
    assert all(re.fullmatch(r"img-\d{6}\.dcm", f) for f in truth.file)
    assert summary.counts == truth.true_region.value_counts().reindex([*REGIONS, UNKNOWN], fill_value=0).to_dict()
    in_domain = [summary.counts[r] for r in REGIONS]
    assert min(in_domain) >= 1  # all 14 regions even at n = 60
    assert max(in_domain) - min(in_domain) <= 2  # balanced up to one study
    assert summary.n_ood == int(truth.ood.sum()) and abs(summary.n_ood - 6) <= 1
    assert summary.n_mislabeled == int(truth.mislabeled.sum())


def test_files_are_valid_dicom_and_decode_to_the_stated_shape(export):
    summary, truth, files = export
    for row in truth.itertuples():
        raw = (summary.dicom_dir / row.file).read_bytes()
        assert raw[128:132] == b"DICM"
        ds = files[row.file]
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == row.transfer_syntax
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == row.sop_class
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == row.sop_instance_uid
        assert ds.Modality == ("DX" if row.sop_class == DigitalXRayImageStorageForPresentation else "CR")
        assert ds.PhotometricInterpretation == row.photometric
        assert ds.BitsStored == row.bits_stored
        assert ds.BitsAllocated == (8 if row.bits_stored == 8 else 16)
        pixels = ds.pixel_array
        assert pixels.shape == (row.rows, row.cols) == (ds.Rows, ds.Columns)
        assert int(pixels.max()) <= (1 << row.bits_stored) - 1
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(row.pixel_spacing_mm)
        assert ds.Manufacturer == row.manufacturer == VENDORS[row.vendor].manufacturer
        assert ds.BodyPartExamined == row.tag_text
        assert ds.StudyDescription == row.study_description
        assert ds.StudyInstanceUID == row.study_instance_uid
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds
        if ds.Modality == "DX":
            assert ds.PresentationIntentType == "FOR PRESENTATION" and "WindowCenter" in ds


def test_every_format_occurs(export):
    _, truth, _ = export
    assert {ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless} <= set(truth.transfer_syntax)
    assert set(truth.photometric) == {"MONOCHROME1", "MONOCHROME2"}
    assert set(truth.bits_stored) == {8, 12, 16}
    assert set(truth.sop_class) == {ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation}
    assert truth.has_gauge.any() and truth.has_marker.any() and truth.has_border.any()
    assert not truth.has_gauge.all()  # lower rate than the augmentation of Langer et al. 2023
    assert {"L", "R"} <= set(truth.marker_text)


def test_monochrome1_is_stored_inverted(export):
    img = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    for bits in (8, 12, 16):
        mono2 = to_stored(img, "MONOCHROME2", bits).astype(np.int64)
        mono1 = to_stored(img, "MONOCHROME1", bits).astype(np.int64)
        np.testing.assert_array_equal(mono1, (1 << bits) - 1 - mono2)
        assert mono2[0, 0] == 0 and mono2[-1, -1] == (1 << bits) - 1
    # In the files: the burnt-in border is white on screen, so its stored value is 0 in MONOCHROME1
    # and full scale in MONOCHROME2 (image corners are always outside the rotated capture).
    summary, truth, files = export
    bordered = truth[truth.has_border]
    assert set(bordered.photometric) == {"MONOCHROME1", "MONOCHROME2"}
    for row in bordered.itertuples():
        px = files[row.file].pixel_array
        corners = [px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]]
        expected = 0 if row.photometric == "MONOCHROME1" else (1 << row.bits_stored) - 1
        assert all(int(c) == expected for c in corners)


def test_angles_span_the_circle(export):
    _, truth, _ = export
    angles = truth.angle_deg.to_numpy(float)
    assert ((angles >= 0) & (angles < 360)).all()
    assert len(np.unique((angles // 45).astype(int))) == 8
    assert truth.mirrored.any() and not truth.mirrored.all()


def test_mislabels_have_the_requested_share_and_are_exactly_the_wrong_tags(export):
    _, truth, _ = export
    inside = truth[~truth.ood]
    wrong = inside.tag_region != inside.true_region
    assert (wrong == inside.mislabeled).all()
    assert inside.mislabeled.sum() == pytest.approx(0.2 * len(inside), abs=1.0)
    assert set(inside[inside.mislabeled].tag_region) <= set(REGIONS)
    assert not truth[truth.ood].mislabeled.any()


def test_tags_are_messy_free_text_from_the_site_vocabulary(export):
    _, truth, _ = export
    for row in truth[(truth.tag_text != "") & (truth.tag_region != UNKNOWN)].itertuples():
        tag = row.tag_text
        words = [to_code_string(w) for ws in BODY_PART_VOCABULARY[row.tag_region].values() for w in ws]
        assert any(tag.startswith(w) or w.startswith(tag) for w in words), row.tag_text
    empty = truth[truth.tag_text == ""]
    assert len(empty) > 0 and (empty.study_description != "").all()  # region only in StudyDescription
    # BodyPartExamined is a valid CS string (the IOD checks demand it); descriptions are LO, any case
    assert all(code_string(t) == t for t in truth.tag_text if t)
    descriptions = truth.study_description
    assert descriptions.str.contains("[a-z]").any() and descriptions.str.contains("[ÄÖÜÉÑÃäöüéñã]").any()
    assert truth.tag_text.nunique() >= 15
    for region, languages in BODY_PART_VOCABULARY.items():
        assert len(languages) == 7 and sum(len(v) for v in languages.values()) >= 9, region
    flat = {w for languages in BODY_PART_VOCABULARY.values() for ws in languages.values() for w in ws}
    assert {"HWS", "BWS", "LWS", "MANO", "GENOU", "Becken", "SCHULTER", "TOBILLO", "VOET", "CRANEO"} <= flat


def test_coded_anatomy_is_wrong_exactly_where_the_tags_are_and_sometimes_missing(export):
    """The Anatomic Region Sequence names what the other tags name (a mislabelled study's code is
    wrong as well), SNOMED CT from vendor A and legacy SNOMED-RT ids from vendor B; a share of the
    images carries none, and DX then carries no BodyPartExamined either (PS3.3 General Anatomy macro)."""
    _, truth, files = export
    coded = truth[truth.region_code != ""]
    assert 0.05 <= 1 - len(coded) / len(truth) <= 0.4
    known = anatomic_region_codes()
    for row in truth.itertuples():
        ds = files[row.file]
        items = ds.get("AnatomicRegionSequence")
        if row.region_code:
            scheme, code = row.region_code.split(":")
            assert (items[0].CodingSchemeDesignator, items[0].CodeValue) == (scheme, code)
            assert scheme == ("SRT" if row.vendor == "B" else "SCT")
            assert known[row.region_code] == row.tag_region  # the matcher's table agrees with synth's
            found = region_from_dataset(ds)
            assert (found.region, found.match) == (row.tag_region, row.region_code)
            assert found.source == "anatomic_region_code"
        elif ds.Modality == "DX":
            assert len(items) == 0 and row.tag_text == ""
        else:
            assert items is None
    assert coded.mislabeled.any() and (coded[coded.mislabeled].tag_region != coded[coded.mislabeled].true_region).all()
    assert {sct for codes in REGION_CODES.values() for sct, _, _ in codes} <= {k[4:] for k in known if k[:4] == "SCT:"}


def test_the_region_matcher_never_contradicts_the_tags(export):
    """Reading the files as ingestion does gives the region the tags denote, or "unknown" (a typo it
    does not accept, a generic description), never another region: no false positives."""
    _, truth, files = export
    found = [region_from_dataset(files[row.file]).region for row in truth.itertuples()]
    agree = [f == t for f, t in zip(found, truth.tag_region)]
    assert all(a or f == UNKNOWN for a, f in zip(agree, found))
    assert sum(agree) >= 0.9 * len(truth)


def test_out_of_domain_images_still_carry_tags(export):
    _, truth, _ = export
    ood = truth[truth.ood]
    assert (ood.true_region == UNKNOWN).all()
    assert set(ood.ood_kind) <= set(OOD_KINDS)
    assert ((ood.tag_text != "") | (ood.study_description != "")).all()


def test_fake_phi_is_set_and_matches_truth(export):
    summary, truth, files = export
    for row in truth.itertuples():
        ds = files[row.file]
        assert str(ds.PatientName) == row.patient_name and "^" in row.patient_name
        assert ds.PatientID == row.patient_id and re.fullmatch(r"PID\d{7}", row.patient_id)
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and re.fullmatch(r"\d{8}", ds.StudyDate)
        assert re.fullmatch(r"\d{6}", ds.StudyTime)
        assert ds.AccessionNumber and ds.InstitutionName and str(ds.ReferringPhysicianName)
        assert row.patient_id not in row.file and row.patient_name.split("^")[0] not in row.file
    per_patient = truth.groupby("patient_id").agg(images=("file", "size"), studies=("study_instance_uid", "nunique"))
    assert per_patient.images.max() >= 2 and per_patient.studies.max() >= 2
    assert (per_patient.studies <= 3).all()
    assert summary.n_patients == len(per_patient)


def test_same_seed_gives_the_same_bytes(tmp_path):
    a = synthesize(tmp_path / "a", n=16, seed=5, mislabel_rate=0.2, shift=0.5, size=48)
    b = synthesize(tmp_path / "b", n=16, seed=5, mislabel_rate=0.2, shift=0.5, size=48)
    c = synthesize(tmp_path / "c", n=16, seed=6, mislabel_rate=0.2, shift=0.5, size=48)
    assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
    for f in sorted(a.dicom_dir.iterdir()):
        assert f.read_bytes() == (b.dicom_dir / f.name).read_bytes()
    assert a.truth_path.read_bytes() != c.truth_path.read_bytes()
    pa = pydicom.dcmread(a.dicom_dir / "img-000000.dcm").pixel_array
    pc = pydicom.dcmread(c.dicom_dir / "img-000000.dcm").pixel_array
    assert pa.shape != pc.shape or not np.array_equal(pa, pc)


def test_workers_write_the_same_files(tmp_path):
    """Each image depends only on its plan and the seed, so rendering in processes changes nothing."""
    serial = synthesize(tmp_path / "serial", n=12, seed=9, mislabel_rate=0.2, shift=0.5, size=48)
    parallel = synthesize(tmp_path / "parallel", n=12, seed=9, mislabel_rate=0.2, shift=0.5, size=48, workers=2)
    assert parallel.truth_path.read_bytes() == serial.truth_path.read_bytes()
    names = sorted(f.name for f in serial.dicom_dir.iterdir())
    assert names == sorted(f.name for f in parallel.dicom_dir.iterdir()) and len(names) == 12
    for name in names:
        assert (parallel.dicom_dir / name).read_bytes() == (serial.dicom_dir / name).read_bytes()
    assert parallel.model_dump(exclude={"out_dir", "dicom_dir", "truth_path"}) == serial.model_dump(
        exclude={"out_dir", "dicom_dir", "truth_path"})
    with pytest.raises(ValueError, match="workers must be >= 1"):
        synthesize(tmp_path / "none", n=4, workers=0)


def _noise_level(img: np.ndarray) -> float:
    """Robust sigma of the pixel noise from the 2x2 second difference (MAD)."""
    d = (img[1:, 1:] - img[:-1, 1:] - img[1:, :-1] + img[:-1, :-1]) / 2.0
    return float(np.median(np.abs(d - np.median(d))) * 1.4826)


def test_shift_brings_in_a_second_vendor_with_different_images(tmp_path):
    runs = {s: synthesize(tmp_path / str(s), n=24, seed=4, shift=s, ood_rate=0.0, size=64) for s in (0.0, 0.5, 1.0)}
    truths = {s: _read_truth(r.truth_path) for s, r in runs.items()}
    assert set(truths[0.0].vendor) == {"A"}
    assert set(truths[1.0].vendor) == {"B"}
    assert set(truths[0.5].vendor) == {"A", "B"}
    assert set(truths[0.0].manufacturer).isdisjoint(truths[1.0].manufacturer)

    def stats(s):
        images = [_display(pydicom.dcmread(runs[s].dicom_dir / f)) for f in truths[s].file]
        return np.array([_noise_level(i) for i in images]), np.array([i.shape[0] for i in images])

    noise_a, rows_a = stats(0.0)
    noise_b, rows_b = stats(1.0)
    assert np.median(noise_b) > 2 * np.median(noise_a)
    assert rows_b.max() < rows_a.min()  # coarser detector matrix
    assert truths[1.0].pixel_spacing_mm.median() > truths[0.0].pixel_spacing_mm.median()


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        synthesize(tmp_path, n=0)
    with pytest.raises(ValueError, match="mislabel_rate"):
        synthesize(tmp_path, n=4, mislabel_rate=1.5)
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path, n=4, size=8)


# --- no shortcut: global statistics do not reveal the region, shapes do ------------------------------


def _global_features(path, ds: pydicom.Dataset) -> list[float]:
    """Cheap cues a shortcut learner would use, on the decoded, min-max scaled image."""
    a = ds.pixel_array.astype(np.float64)
    a = (a - a.min()) / max(float(np.ptp(a)), 1e-9)
    hist = np.histogram(a, bins=16, range=(0.0, 1.0))[0] / a.size
    corners = [a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]
    return [a.mean(), a.std(), *hist, *corners, path.stat().st_size / 1e4, int(ds.BitsStored),
            float(ds.PhotometricInterpretation == "MONOCHROME1")]


def _hog(img: np.ndarray, cell: int = 8, bins: int = 9) -> np.ndarray:
    """Histogram of oriented gradients per cell: a plain shape descriptor."""
    gy, gx = np.gradient(img.astype(np.float64))
    magnitude = np.hypot(gx, gy)
    orientation = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * bins).astype(int), bins - 1)
    h, w = img.shape
    cells = (np.arange(h)[:, None] // cell) * (w // cell) + np.arange(w)[None, :] // cell
    f = np.bincount((cells * bins + orientation).ravel(), magnitude.ravel(), (h // cell) * (w // cell) * bins)
    return np.sqrt(f / (np.linalg.norm(f) + 1e-9))


def test_no_trivial_cue_but_shapes_are_learnable(tmp_path):
    n = 420  # 30 per region
    run = synthesize(tmp_path, n=n, seed=11, ood_rate=0.0, size=64)
    truth = _read_truth(run.truth_path)
    features = []
    for f in truth.file:
        ds = pydicom.dcmread(run.dicom_dir / f)
        features.append(_global_features(run.dicom_dir / f, ds))
    x, y = np.array(features), truth.true_region.to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    cue_accuracy = cross_val_score(model, x, y, cv=5).mean()

    rng = np.random.default_rng(0)
    shapes, labels = [], []
    for k, region in enumerate(REGIONS):
        for i in range(20):
            img = draw_region(region, np.random.default_rng([17, k, i]), 64)
            shapes.append(_hog((img - img.min()) / max(float(np.ptp(img)), 1e-9)))
            labels.append(region)
    order = rng.permutation(len(labels))
    xs, ys = np.array(shapes)[order], np.array(labels)[order]
    cut = int(0.7 * len(ys))
    shape_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.05)).fit(xs[:cut], ys[:cut])
    shape_accuracy = float((shape_model.predict(xs[cut:]) == ys[cut:]).mean())

    print(f"global-feature accuracy {cue_accuracy:.3f} (chance {1 / len(REGIONS):.3f}); "
          f"HOG shape accuracy {shape_accuracy:.3f}")
    assert cue_accuracy < 0.25
    assert shape_accuracy > 0.7
    assert shape_accuracy > cue_accuracy + 0.4
