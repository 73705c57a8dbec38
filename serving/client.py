"""Client side of the inference API: DICOM files in, `InferenceResponse`s out.

Uses kserve's own `InferenceRESTClient` with the Open Inference Protocol v2 and the binary
data extension, which is what a hospital integration would call.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from serving.schema import ServedResponse, parse_infer_response
from xrayops.contracts import InferenceResponse

__all__ = ["build_infer_request", "parse_infer_response", "predict_files", "ServedResponse"]


def build_infer_request(
    model_name: str, dicoms: Sequence[bytes], gradcam: bool = False, upright: bool = False
) -> InferRequest:
    """One v2 request carrying each DICOM file as one element of a BYTES input named `dicom`."""
    tensor = InferInput(name="dicom", shape=[len(dicoms)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(list(dicoms), dtype=np.object_), binary_data=True)
    parameters = {name: True for name, on in (("gradcam", gradcam), ("upright", upright)) if on}
    return InferRequest(model_name=model_name, infer_inputs=[tensor], parameters=parameters or None)


async def _predict(
    url: str, model_name: str, blobs: list[bytes], batch_size: int, gradcam: bool, upright: bool
) -> list[InferenceResponse]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=2))
    try:
        results: list[InferenceResponse] = []
        for start in range(0, len(blobs), batch_size):
            request = build_infer_request(model_name, blobs[start : start + batch_size], gradcam, upright)
            results.extend(parse_infer_response(await client.infer(url, request, model_name=model_name)))
        return results
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
    return asyncio.run(_predict(url, model_name, blobs, batch_size, gradcam, upright))
