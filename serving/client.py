"""Client side of the inference API: DICOM files in, `InferenceResponse`s out.

Uses kserve's own `InferenceRESTClient` with the Open Inference Protocol v2 and the binary
data extension, which is what a hospital integration would call. With `sr` each image's DICOM
Structured Report comes back too, as base64 text in the JSON answer: kserve 0.21's REST client
decodes binary BYTES outputs as UTF-8, which a Part 10 file is not (gRPC carries them raw).

`EndpointClient` is the routing node's way in (xrayops.route): REST v2 or gRPC, a bearer token,
one persistent connection on its own event loop, failures as `xrayops.route.EndpointError` that
say whether a retry can help.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from serving.schema import PARAM_SR, ServedResponse, parse_infer_response, parse_sr_output
from xrayops.contracts import InferenceResponse

__all__ = ["build_infer_request", "parse_infer_response", "predict_files", "predict_files_with_sr", "ServedResponse",
           "EndpointClient"]  # fmt: skip


def build_infer_request(
    model_name: str, dicoms: Sequence[bytes], gradcam: bool = False, upright: bool = False, sr: bool = False
) -> InferRequest:
    """One v2 request carrying each DICOM file as one element of a BYTES input named `dicom`;
    with `sr`, each image's SR is asked for too."""
    tensor = InferInput(name="dicom", shape=[len(dicoms)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(list(dicoms), dtype=np.object_), binary_data=True)
    parameters = {name: True for name, on in (("gradcam", gradcam), ("upright", upright), (PARAM_SR, sr)) if on}
    return InferRequest(model_name=model_name, infer_inputs=[tensor], parameters=parameters or None)


async def _predict(
    url: str, model_name: str, blobs: list[bytes], batch_size: int, gradcam: bool, upright: bool, sr: bool = False,
) -> tuple[list[InferenceResponse], list[bytes]]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=2))
    try:
        results: list[InferenceResponse] = []
        srs: list[bytes] = []
        for start in range(0, len(blobs), batch_size):
            request = build_infer_request(model_name, blobs[start : start + batch_size], gradcam, upright, sr)
            response = await client.infer(url, request, model_name=model_name)
            results.extend(parse_infer_response(response))
            srs.extend(parse_sr_output(response) if sr else [])
        return results, srs
    finally:
        await client.close()


def predict_files(
    url: str, model_name: str, files: Sequence[Path], batch_size: int = 16, gradcam: bool = False,
    upright: bool = False,
) -> list[InferenceResponse]:
    """Send DICOM files to a running server in batches; one response per file, in order
    (`ServedResponse`, an `InferenceResponse` with the Grad-CAM PNG when `gradcam` and the
    upright-turned image when `upright`)."""
    blobs = [Path(f).read_bytes() for f in files]
    return asyncio.run(_predict(url, model_name, blobs, batch_size, gradcam, upright))[0]


def predict_files_with_sr(
    url: str, model_name: str, files: Sequence[Path], batch_size: int = 16, gradcam: bool = False,
    upright: bool = False,
) -> tuple[list[InferenceResponse], list[bytes]]:
    """`predict_files` plus each file's DICOM SR (Part 10 bytes), in order."""
    blobs = [Path(f).read_bytes() for f in files]
    responses, srs = asyncio.run(_predict(url, model_name, blobs, batch_size, gradcam, upright, sr=True))
    if len(srs) != len(responses):
        raise ValueError(f"the server answered {len(responses)} images but sent {len(srs)} SRs")
    return responses, srs
