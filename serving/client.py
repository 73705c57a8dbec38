"""Client side of the inference API: DICOM files in, `InferenceResponse`s out.

Uses kserve's own `InferenceRESTClient` with the Open Inference Protocol v2 and the binary
data extension, which is what a hospital integration would call.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig

from xrayops.contracts import InferenceResponse
from xrayops.regions import REGIONS


def build_infer_request(model_name: str, dicoms: Sequence[bytes]) -> InferRequest:
    """One v2 request carrying each DICOM file as one element of a BYTES input named `dicom`."""
    tensor = InferInput(name="dicom", shape=[len(dicoms)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(list(dicoms), dtype=np.object_), binary_data=True)
    return InferRequest(model_name=model_name, infer_inputs=[tensor])


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _param_text(value) -> str:
    """A v2 parameter may arrive as a plain value or as an InferParameter-like object."""
    if value is None:
        return ""
    for attr in ("string_param", "value"):
        if hasattr(value, attr):
            return str(getattr(value, attr))
    return str(value)


def parse_infer_response(response: InferResponse) -> list[InferenceResponse]:
    out = {o.name: o.as_numpy() for o in response.outputs}
    probs = out["probabilities"]
    # kserve's InferResponse.from_bytes drops model_version; the server repeats it in parameters.
    params = response.parameters or {}
    version = response.model_version or _param_text(params.get("model_version")) or ""
    results = []
    for i in range(probs.shape[0]):
        results.append(
            InferenceResponse(
                region=_text(out["region"][i]),
                confidence=float(out["confidence"][i]),
                probabilities={name: float(p) for name, p in zip(REGIONS, probs[i])},
                ood_score=float(out["ood_score"][i]) if "ood_score" in out else None,
                ood=bool(out["ood"][i]) if "ood" in out else None,
                dicom_region=_text(out["dicom_region"][i]) if "dicom_region" in out else "unknown",
                label_disagreement=bool(out["label_disagreement"][i]) if "label_disagreement" in out else False,
                model_name=response.model_name or "",
                model_version=version,
            )
        )
    return results


async def _predict(url: str, model_name: str, blobs: list[bytes], batch_size: int) -> list[InferenceResponse]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=2))
    try:
        results: list[InferenceResponse] = []
        for start in range(0, len(blobs), batch_size):
            request = build_infer_request(model_name, blobs[start : start + batch_size])
            results.extend(parse_infer_response(await client.infer(url, request, model_name=model_name)))
        return results
    finally:
        await client.close()


def predict_files(url: str, model_name: str, files: Sequence[Path], batch_size: int = 16) -> list[InferenceResponse]:
    """Send DICOM files to a running server in batches; one `InferenceResponse` per file, in order."""
    blobs = [Path(f).read_bytes() for f in files]
    return asyncio.run(_predict(url, model_name, blobs, batch_size))
