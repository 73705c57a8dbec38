"""Unit tests of the serving layer's own logic: ensemble averaging, Grad-CAM, the micro-batcher,
the body-size limit, request parsing and the DICOM transformer's header checks. No server here."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput
from torch import nn

from serving.batcher import MicroBatcher
from serving.errors import PayloadTooLarge, UnsupportedMedia, status_error_handler
from serving.schema import decode_v2, gradcam_requested
from serving.kserve_compat import BodyLimitMiddleware
from serving.schema import infer_request_from_binary
from serving.transformer import DecodeLimits, check_header, decode_dicom, pixels_request
from test_serving_support import SIZE, huge_header_dicom, make_bundle, make_dataset, make_dicom, unsupported_codec_dicom
from xrayops.bundle import load_bundle
from xrayops.contracts import InferenceResponse, ModelBundleMeta, PreprocessingSpec
from xrayops.ensemble import (
    EnsembleError,
    average_probabilities,
    check_members,
    circular_mean_deg,
    combine_responses,
    ensemble_version,
    predict_ensemble,
)
from xrayops.gradcam import grad_cam, heatmap_png, png_to_heatmap
from xrayops.inference import predict_arrays
from xrayops.models.backbone import build_backbone
from xrayops.models.heads import RegionClassifier

CLASSES = ["hand", "wrist", "knee"]
SPEC = PreprocessingSpec(size=SIZE)


def meta(threshold: float | None = 0.0, confidence: float = 0.5, classes=CLASSES, spec=SPEC) -> ModelBundleMeta:
    return ModelBundleMeta(classes=classes, preprocessing=spec, ood_threshold=threshold, confidence_threshold=confidence)


def answer(probs, ood_score=0.0, angle=None, dicom_region="unknown") -> InferenceResponse:
    best = int(np.argmax(probs))
    return InferenceResponse(
        region=CLASSES[best], confidence=float(probs[best]), probabilities=dict(zip(CLASSES, map(float, probs))),
        ood_score=ood_score, orientation_deg=angle, dicom_region=dicom_region,
    )


# --- ensemble ------------------------------------------------------------------------------

def test_average_probabilities_is_the_member_mean_with_the_argmax_of_the_sum():
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    b = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    c = np.array([[0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    mean = average_probabilities([a, b, c])
    np.testing.assert_allclose(mean, (a + b + c) / 3)
    # paper 000: argmax of the summed softmax; the first image goes to class 1 though 2 of 3 members say 0.
    assert mean.argmax(axis=1).tolist() == (a + b + c).argmax(axis=1).tolist() == [1, 1]
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)
    with pytest.raises(EnsembleError, match="differ in shape"):
        average_probabilities([a, b[:1]])


def test_circular_mean_wraps_around_zero():
    assert circular_mean_deg([350.0, 10.0]) == pytest.approx(0.0, abs=1e-9)
    assert circular_mean_deg([80.0, 100.0]) == pytest.approx(90.0)
    assert circular_mean_deg([270.0]) == pytest.approx(270.0)


def test_combine_averages_members_and_recomputes_flags():
    metas = [meta(threshold=-1.0, confidence=0.5), meta(threshold=-3.0, confidence=0.5)]
    member_a = [answer([0.7, 0.2, 0.1], ood_score=0.0, angle=350.0, dicom_region="wrist")]
    member_b = [answer([0.1, 0.8, 0.1], ood_score=-4.0, angle=20.0, dicom_region="wrist")]
    (out,) = combine_responses([member_a, member_b], metas, "ens", "v1")
    assert out.probabilities == pytest.approx({"hand": 0.4, "wrist": 0.5, "knee": 0.1})
    assert (out.region, out.confidence) == ("wrist", pytest.approx(0.5))
    # margins over own thresholds: 0 - (-1) = 1 and -4 - (-3) = -1 -> mean 0, not > 0
    assert out.ood_score == pytest.approx(0.0) and out.ood is False
    assert out.orientation_deg == pytest.approx(5.0)
    assert out.label_disagreement is False  # the ensemble agrees with the tag
    (flagged,) = combine_responses([member_a, [answer([0.9, 0.05, 0.05], dicom_region="wrist")]], metas, "ens", "v1")
    assert flagged.region == "hand" and flagged.label_disagreement is True
    assert (flagged.model_name, flagged.model_version) == ("ens", "v1")


def test_combine_without_orientation_or_thresholds_gives_none():
    metas = [meta(threshold=None), meta(threshold=None)]
    (out,) = combine_responses([[answer([0.5, 0.3, 0.2], ood_score=-2.0)], [answer([0.5, 0.3, 0.2], ood_score=-4.0)]],
                               metas, "ens", "v")
    assert out.orientation_deg is None and out.ood is None and out.ood_score == pytest.approx(-3.0)


def test_single_member_passes_through_unchanged():
    response = answer([0.2, 0.7, 0.1], ood_score=1.5, angle=42.0)
    (out,) = combine_responses([[response]], [meta()], "served", "abc")
    assert out.model_dump(exclude={"model_name", "model_version"}) == response.model_dump(
        exclude={"model_name", "model_version"})
    assert ensemble_version(["abc"]) == "abc"
    assert ensemble_version(["abc", "def"]) != ensemble_version(["def", "abc"])


def test_members_must_share_classes_and_preprocessing():
    check_members([meta(), meta()])
    with pytest.raises(EnsembleError, match="classes"):
        check_members([meta(), meta(classes=["hand", "knee", "wrist"])])
    with pytest.raises(EnsembleError, match="preprocessing"):
        check_members([meta(), meta(spec=PreprocessingSpec(size=64))])
    with pytest.raises(EnsembleError, match="at least one"):
        check_members([])


def test_predict_ensemble_averages_real_members(tmp_path):
    members = [load_bundle(make_bundle(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8) for _ in range(3)]
    responses, embeddings = predict_ensemble(members, images, ["hand", "unknown", "knee"])
    singles = [predict_arrays(m, images)[0] for m in members]
    for i, r in enumerate(responses):
        expected = {c: np.mean([s[i].probabilities[c] for s in singles]) for c in r.probabilities}
        assert r.probabilities == pytest.approx(expected, abs=1e-6)
        assert r.region == max(expected, key=expected.get)
    assert embeddings.shape == (3, 512)
    np.testing.assert_allclose(embeddings, predict_arrays(members[0], images)[1], rtol=1e-5)


# --- Grad-CAM ------------------------------------------------------------------------------

class PoolModel(nn.Module):
    """logit_c = w_c * mean(layer4(x)); with layer4 = identity the Grad-CAM of a class with
    w_c > 0 is ReLU(x) scaled to [0, 1]: the image itself."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.layer4 = nn.Identity()
        self.weights = torch.tensor([2.0, -1.0])

    def forward(self, x):
        pooled = self.backbone.layer4(x).mean(dim=(1, 2, 3))
        return pooled[:, None] * self.weights[None, :]


def test_grad_cam_matches_the_closed_form():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2:4, 5:7] = 1.0
    image[0, 0, 6, 1] = 0.5
    heatmap = grad_cam(PoolModel(), image, [0])[0]
    np.testing.assert_allclose(heatmap, image[0, 0].numpy(), atol=1e-6)
    # The negatively weighted class has no positive evidence anywhere: an all-zero map.
    assert grad_cam(PoolModel(), image, [1])[0].max() == 0.0


def test_grad_cam_follows_a_rotation_of_the_input_for_a_rotation_averaged_model():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    model = RegionClassifier(backbone, dim, 4, rotation_average=True).eval()
    image = torch.rand(1, 1, 64, 64)
    turned = torch.rot90(image, 1, dims=(-2, -1))
    target = int(model(image).argmax())
    heatmap = grad_cam(model, image, [target])[0]
    heatmap_turned = grad_cam(model, turned, [target])[0]
    assert heatmap.shape == (64, 64) and 0.0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)
    np.testing.assert_allclose(heatmap_turned, np.rot90(heatmap, 1), atol=1e-4)


def test_heatmap_png_round_trip():
    heatmap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    data = heatmap_png(heatmap)
    assert data.startswith(b"\x89PNG") and len(data) < 4096
    np.testing.assert_allclose(png_to_heatmap(data), heatmap, atol=1 / 255)


# --- micro-batcher -------------------------------------------------------------------------

def test_micro_batcher_merges_concurrent_requests_in_order():
    batches = []

    def run(items):
        batches.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(run, max_batch_size=8, max_latency_s=0.2)
        try:
            return await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]), batcher.submit([4, 5, 6]))
        finally:
            batcher.close()

    assert asyncio.run(main()) == [[10, 20], [30], [40, 50, 60]]
    assert batches == [[1, 2, 3, 4, 5, 6]]  # one forward pass for three requests


def test_micro_batcher_respects_the_batch_size_and_reports_errors():
    batches = []

    def run(items):
        batches.append(len(items))
        if 99 in items:
            raise ValueError("bad item")
        return items

    async def main():
        batcher = MicroBatcher(run, max_batch_size=2, max_latency_s=0.05)
        try:
            ok = await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
            with pytest.raises(ValueError, match="bad item"):
                await batcher.submit([99])
            after = await batcher.submit([7])  # the worker survives a failed batch
            return ok, after
        finally:
            batcher.close()

    ok, after = asyncio.run(main())
    assert ok == [[0], [1], [2], [3], [4]] and after == [7]
    assert max(batches) <= 2 and sum(batches[:3]) == 5


# --- body-size limit -----------------------------------------------------------------------

def limited_app(max_bytes: int) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    app.add_exception_handler(PayloadTooLarge, status_error_handler)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    return app


def post(app, **kwargs) -> httpx.Response:
    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/echo", **kwargs)

    return asyncio.run(call())


def test_body_limit_by_content_length_and_by_counting():
    app = limited_app(1000)
    assert post(app, content=b"x" * 1000).json() == {"n": 1000}
    declared = post(app, content=b"x" * 1001)
    assert declared.status_code == 413 and "over the limit of 1000 bytes" in declared.json()["error"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"y" * 300

    streamed = post(app, content=chunks())
    assert streamed.status_code == 413 and "XRAYOPS_SERVE_MAX_REQUEST_MB" in streamed.json()["error"]


# --- request parsing and the transformer ---------------------------------------------------

@pytest.mark.parametrize("value, expected", [(None, False), (True, True), (False, False), ("true", True), (0, False)])
def test_gradcam_parameter(value, expected):
    assert gradcam_requested(None if value is None else {"gradcam": value}) is expected


def test_gradcam_parameter_rejects_nonsense():
    with pytest.raises(InvalidInput, match="gradcam"):
        gradcam_requested({"gradcam": "maybe"})


def no_dicoms(blobs, name):
    raise AssertionError("no DICOM expected")


@pytest.mark.parametrize("wire", ["rest", "grpc"])
def test_pixels_with_region_and_meta_as_the_transformer_sends_them(wire):
    decoded = [decode_dicom(make_dicom(body_part=b, seed=i), SPEC, DecodeLimits(), "key", "x")
               for i, b in enumerate(["KNEE", ""])]
    from serving.schema import ImageBatch

    batch = ImageBatch("v2", "rid", [d.pixels for d in decoded], [d.dicom_region for d in decoded],
                       [d.meta for d in decoded], gradcam=True)
    request = pixels_request("m", batch)
    body = json.dumps(request.to_rest()[0]).encode()
    # The predictor side: the same request, parsed back as the server does for each protocol.
    received = (infer_request_from_binary(body, len(body), "m") if wire == "rest"
                else InferRequest.from_grpc(request.to_grpc()))
    parsed = decode_v2(received, SIZE, "rid", no_dicoms)
    assert parsed.dicom_regions == ["knee", "unknown"] and parsed.gradcam is True
    assert [m["manufacturer"] for m in parsed.image_meta] == ["ACME", "ACME"]
    assert all(m["image_id"].startswith("img-") for m in parsed.image_meta)
    assert b"PAT-0001" not in body and b"Doe^Jane" not in body  # pseudonyms only on the wire
    np.testing.assert_allclose(parsed.pixels[0], decoded[0].pixels / 255.0, atol=1e-6)


def test_extra_or_duplicate_inputs_are_rejected():
    pixels = InferInput("pixels", [1, SIZE, SIZE], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, SIZE, SIZE), np.float32))
    extra = InferInput("dicom_region", [1], "BYTES")
    extra.set_data_from_numpy(np.array(["hand"], dtype=np.object_))
    with pytest.raises(InvalidInput, match="expected one input"):
        decode_v2(InferRequest("m", [pixels, pixels]), SIZE, "r", no_dicoms)
    dicom = InferInput("dicom", [1], "BYTES")
    dicom.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InvalidInput, match="expected one input"):
        decode_v2(InferRequest("m", [dicom, extra]), SIZE, "r", no_dicoms)
    short = InferInput("dicom_region", [2], "BYTES")
    short.set_data_from_numpy(np.array(["hand", "knee"], dtype=np.object_))
    with pytest.raises(InvalidInput, match="2 elements for 1 images"):
        decode_v2(InferRequest("m", [pixels, short]), SIZE, "r", no_dicoms)


def test_header_checks_run_before_decoding(monkeypatch):
    import serving.transformer as transformer

    def must_not_decode(*_args, **_kwargs):
        raise AssertionError("decoded although the header already says no")

    monkeypatch.setattr(transformer, "preprocess", must_not_decode)
    with pytest.raises(PayloadTooLarge, match="10000x10000"):
        decode_dicom(huge_header_dicom(), SPEC, DecodeLimits(), "k", "x")
    with pytest.raises(InvalidInput, match="50-frame"):
        decode_dicom(make_dicom(frames=50, rows=8, cols=8), SPEC, DecodeLimits(), "k", "x")
    check_header(make_dataset(frames=3), DecodeLimits(max_frames=3), "x")  # a configured limit allows it


def test_unsupported_codec_is_its_own_error():
    with pytest.raises(UnsupportedMedia, match="unsupported_transfer_syntax"):
        decode_dicom(unsupported_codec_dicom(), SPEC, DecodeLimits(), "k", "x")


# --- InferenceGraph combiner ---------------------------------------------------------------

def test_combiner_averages_the_ensemble_routers_answers(tmp_path):
    from serving.combiner import EnsembleCombiner

    dirs = [make_bundle(tmp_path / m, seed=i, ssl_method=m) for i, m in enumerate(["byol", "simclr"])]
    combiner = EnsembleCombiner("graph", dirs)
    assert combiner.load()
    members = [load_bundle(d) for d in dirs]
    images = [np.full((SIZE, SIZE), 40 * i, dtype=np.uint8) for i in range(1, 3)]
    routed = {name: {"predictions": [r.model_dump(mode="json") for r in predict_arrays(m, images)[0]]}
              for name, m in zip(["byol", "simclr"], members)}
    combined = asyncio.run(combiner.predict(routed))["predictions"]
    expected, _ = predict_ensemble(members, images)
    assert [p["region"] for p in combined] == [r.region for r in expected]
    for got, want in zip(combined, expected):
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    with pytest.raises(InvalidInput, match="2 ensemble members"):
        asyncio.run(combiner.predict({"byol": routed["byol"]}))
    with pytest.raises(InvalidInput, match="no v1 'predictions'"):
        asyncio.run(combiner.predict({"byol": routed["byol"], "simclr": {"outputs": []}}))
