"""predict_arrays / predict_datasets: calibrated probabilities, OOD flag, label disagreement, logs."""
import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xrayops.bundle import load_bundle, save_bundle
from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
from xrayops.dicom.deid import pseudonymize
from xrayops.dicom.pixels import image_statistics, preprocess
from xrayops.inference import InferenceInputError, label_disagreement, predict_arrays, predict_datasets
from xrayops.models import RegionClassifier, build_backbone, energy_score
from xrayops.regions import REGIONS

torch.set_num_threads(1)
SIZE = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = RegionClassifier(*build_backbone(), n_classes=len(REGIONS))
    with torch.no_grad():
        model.head.weight.mul_(20)  # spread the logits so predictions differ between images
    meta = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(size=SIZE), temperature=2.0)
    with torch.no_grad():
        scores = energy_score(model.eval()(torch.rand(16, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))), 2.0)
    meta = meta.model_copy(update={"ood_threshold": float(scores.median())})
    bundle_dir = tmp_path_factory.mktemp("bundle")
    save_bundle(bundle_dir, model, meta)
    return load_bundle(bundle_dir)


def images(n: int, seed: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(n)]


def test_probabilities_are_the_temperature_scaled_softmax(bundle):
    arrays = images(5)
    responses, embeddings = predict_arrays(bundle, arrays)
    x = torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1)
    with torch.no_grad():
        logits = bundle.model(x)
        expected = torch.softmax(logits / 2.0, 1).numpy()
        expected_embeddings = bundle.model.embed(x).numpy()
    scores = energy_score(logits, 2.0).numpy()
    assert np.allclose(embeddings, expected_embeddings, atol=1e-5)
    for response, probs, score in zip(responses, expected, scores):
        assert response.region == REGIONS[probs.argmax()]
        assert response.confidence == pytest.approx(probs.max(), abs=1e-6)
        assert sum(response.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert response.ood_score == pytest.approx(score, abs=1e-4)
        assert response.ood == (response.ood_score > bundle.meta.ood_threshold)
        assert response.model_name == "xrayops-region" and response.model_version == bundle.meta.weights_sha256[:12]
    assert len({r.region for r in responses}) > 1


def test_batching_and_pixel_dtype_do_not_change_predictions(bundle):
    arrays = images(5)
    one_by_one, _ = predict_arrays(bundle, arrays, batch_size=1)
    together, _ = predict_arrays(bundle, arrays, batch_size=64)
    as_uint16, _ = predict_arrays(bundle, [a.astype(np.uint16) * 257 for a in arrays])
    as_float, _ = predict_arrays(bundle, [a / 255.0 for a in arrays])
    for a, b, c, d in zip(one_by_one, together, as_uint16, as_float):
        assert a.region == b.region == c.region == d.region
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5) == pytest.approx(c.confidence, abs=1e-5)
    responses, embeddings = predict_arrays(bundle, [])
    assert responses == [] and embeddings.shape == (0, 512)


@pytest.mark.parametrize(
    "dicom_region,region,confidence,threshold,expected",
    [
        ("hand", "wrist", 0.95, 0.9, True),  # known tag, different, confident
        ("hand", "wrist", 0.85, 0.9, False),  # not confident enough
        ("hand", "hand", 0.99, 0.9, False),  # agrees
        ("unknown", "wrist", 0.99, 0.9, False),  # no tag to disagree with
        ("hand", "wrist", 0.9, 0.9, True),  # threshold is inclusive
    ],
)
def test_label_disagreement_rule(dicom_region, region, confidence, threshold, expected):
    assert label_disagreement(dicom_region, region, confidence, threshold) is expected


def test_label_disagreement_in_predictions(bundle):
    arrays = images(4)
    responses, _ = predict_arrays(bundle, arrays)
    predicted = [r.region for r in responses]
    other = [REGIONS[(REGIONS.index(p) + 1) % len(REGIONS)] for p in predicted]
    agree, _ = predict_arrays(bundle, arrays, predicted)
    assert not any(r.label_disagreement for r in agree)
    bundle_any = type(bundle)(bundle.model, bundle.meta.model_copy(update={"confidence_threshold": 0.0}), bundle.device)
    disagree, _ = predict_arrays(bundle_any, arrays, other)
    assert all(r.label_disagreement for r in disagree) and [r.dicom_region for r in disagree] == other
    bundle_never = type(bundle)(bundle.model, bundle.meta.model_copy(update={"confidence_threshold": 1.0}), bundle.device)
    assert not any(r.label_disagreement for r in predict_arrays(bundle_never, arrays, other)[0])
    junk, _ = predict_arrays(bundle_any, arrays, ["banana", "unknown", "", "hand"])
    assert [r.dicom_region for r in junk[:3]] == ["unknown"] * 3


def test_bad_arrays_are_rejected_with_their_position(bundle):
    good = images(1)[0]
    with pytest.raises(InferenceInputError, match=r"input 1: expected a preprocessed \(32, 32\) image, got shape \(16, 16\)"):
        predict_arrays(bundle, [good, good[:16, :16]])
    with pytest.raises(InferenceInputError, match="input 0: pixel dtype int32"):
        predict_arrays(bundle, [good.astype(np.int32)])
    with pytest.raises(InferenceInputError, match="within \\[0, 1\\]"):
        predict_arrays(bundle, [good.astype(np.float32)])
    with pytest.raises(ValueError, match="2 images but 1 dicom_regions"):
        predict_arrays(bundle, [good, good], ["hand"])


def radiograph(body_part: str, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((40, 48)) * 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "PAT-0042", "Doe^Jane"
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "DX", "ACME", body_part
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 40, 48, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelData = pixels.tobytes()
    return ds


def test_predict_datasets_builds_responses_and_phi_free_logs(bundle):
    datasets = [radiograph("HAND", 0), radiograph("KNIE", 1), radiograph("", 2)]
    responses, records = predict_datasets(bundle, datasets, "req-1", key="k")
    arrays = [preprocess(ds, bundle.meta.preprocessing) for ds in datasets]
    direct, embeddings = predict_arrays(bundle, arrays, [r.dicom_region for r in responses])
    assert [r.dicom_region for r in responses] == ["hand", "knee", "unknown"]
    assert responses == direct
    for ds, array, record, response, embedding in zip(datasets, arrays, records, responses, embeddings):
        assert record.request_id == "req-1" and record.image_id == pseudonymize(ds.SOPInstanceUID, "k", "img-")
        assert (record.pixel_mean, record.pixel_std) == pytest.approx(image_statistics(array))
        assert record.region == response.region and record.dicom_region == response.dicom_region
        assert record.label_disagreement == response.label_disagreement and record.ood_score == response.ood_score
        assert record.manufacturer == "ACME" and record.pixel_spacing == pytest.approx(0.2)
        assert np.allclose(record.embedding, embedding, atol=1e-6)
        dumped = record.model_dump_json()
        assert "PAT-0042" not in dumped and "Doe" not in dumped and str(ds.SOPInstanceUID) not in dumped


def test_undecodable_dataset_is_named(bundle):
    broken = radiograph("HAND", 3)
    del broken.PixelData
    with pytest.raises(InferenceInputError, match="input 1: no_pixel_data"):
        predict_datasets(bundle, [radiograph("HAND", 4), broken], "req-2", key="k")
