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
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.errors import InferenceError, InvalidInput

from serving.schema import PARAM_SR, ServedResponse, parse_infer_response, parse_sr_output
from xrayops.contracts import InferenceResponse
from xrayops.errors import XrayopsError

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


# ------------------------------------------------------------------ the routing node's endpoint

# How a failed call is classed for the node's retries (xrayops.route.errors.FailureKind).
REJECTED_STATUSES = {400, 413, 415, 422}  # the data: split the request, dead-letter the bad file
REFUSED_STATUSES = {401: "endpoint_unauthorized", 403: "endpoint_unauthorized", 404: "endpoint_not_found"}
_DICOM_REASON = re.compile(r"is not usable DICOM \(([a-z_]+)")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a study's request over gRPC (the server takes as much, XRAYOPS_SERVE_MAX_REQUEST_MB)


class EndpointClient:
    """The endpoint as the routing node calls it: `client(blobs)` -> EndpointAnswer (a response and
    an SR per file), over REST v2 or gRPC with `Authorization: Bearer <token>` when a token is set.

    kserve's async clients run on this object's own event loop thread, so one connection serves
    every worker thread. Failures are `xrayops.route.EndpointError`s: reason codes for logs and
    metrics; the server's message about the data goes only into `detail` (the dead-letter file)."""

    def __init__(self, endpoint: str, model_name: str, protocol: str = "rest", token=None,
                 timeout: float = 120.0, transport=None) -> None:  # fmt: skip
        """`token`: a string, or a function returning the current one (a rotated token file)."""
        if protocol not in ("rest", "grpc"):
            raise ValueError(f"protocol must be rest or grpc, got {protocol!r}")
        self.endpoint, self.model_name, self.protocol, self.timeout = endpoint.rstrip("/"), model_name, protocol, timeout
        self._token, self._transport = token, transport
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="endpoint-client", daemon=True)
        self._thread.start()
        self._client = None

    def __call__(self, blobs: list[bytes]):
        future = asyncio.run_coroutine_threadsafe(self._infer(blobs), self._loop)
        return future.result(timeout=self.timeout + 30)

    def close(self) -> None:
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _make_client(self):
        if self.protocol == "grpc":
            return InferenceGRPCClient(self.endpoint, timeout=self.timeout, retries=0, channel_args=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])  # fmt: skip
        return InferenceRESTClient(RESTConfig(protocol="v2", timeout=self.timeout, retries=0, transport=self._transport))

    async def _infer(self, blobs: list[bytes]):
        from xrayops.route import EndpointAnswer, EndpointError

        if self._client is None:
            self._client = self._make_client()
        request = build_infer_request(self.model_name, blobs, sr=True)
        try:
            token = self._token() if callable(self._token) else self._token
        except XrayopsError as exc:  # a token file that went away: the node cannot authenticate
            raise EndpointError("refused", "endpoint_token_unreadable", str(exc)) from None
        bearer = {"authorization": f"Bearer {token}"} if token else {}
        try:
            if self.protocol == "grpc":
                response = await self._client.infer(request, headers=list(bearer.items()) or None)
            else:
                response = await self._client.infer(self.endpoint, request, model_name=self.model_name,
                                                    headers=bearer or None)  # fmt: skip
            responses, srs = parse_infer_response(response), parse_sr_output(response)
        except httpx.HTTPStatusError as exc:
            raise _http_failure(exc.response) from None
        except httpx.TimeoutException:
            raise EndpointError("retryable", "endpoint_timeout") from None
        except httpx.TransportError as exc:  # refused, reset, DNS: nobody answered
            raise EndpointError("retryable", "endpoint_unreachable", type(exc).__name__) from None
        except grpc.aio.AioRpcError as exc:
            raise _grpc_failure(exc) from None
        except (ValueError, KeyError, IndexError, InferenceError, InvalidInput) as exc:  # an answer we cannot read
            raise EndpointError("rejected", "endpoint_bad_answer", type(exc).__name__) from None
        return EndpointAnswer(responses=responses, srs=srs)


def _http_failure(response: httpx.Response):
    from xrayops.route import EndpointError

    status = response.status_code
    if status in REJECTED_STATUSES:
        message = _server_message(response)
        found = _DICOM_REASON.search(message)
        reason = f"endpoint_rejected_{found.group(1)}" if found else f"endpoint_rejected_http_{status}"
        return EndpointError("rejected", reason, f"HTTP {status}: {message}")
    if status in REFUSED_STATUSES:
        return EndpointError("refused", REFUSED_STATUSES[status], f"HTTP {status}")
    # 429, 5xx: the server's trouble (its message can quote what it was sent: not kept)
    return EndpointError("retryable", f"endpoint_http_{status}", f"HTTP {status}")


def _server_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))[:500]
    except (ValueError, AttributeError):
        return ""


def _grpc_failure(exc):
    from xrayops.route import EndpointError

    code = exc.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        message = str(exc.details() or "")[:500]
        found = _DICOM_REASON.search(message)
        reason = f"endpoint_rejected_{found.group(1)}" if found else "endpoint_rejected_grpc_invalid_argument"
        return EndpointError("rejected", reason, f"gRPC {code.name}: {message}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EndpointError("refused", "endpoint_unauthorized", f"gRPC {code.name}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
        return EndpointError("refused", "endpoint_not_found", f"gRPC {code.name}")
    return EndpointError("retryable", f"endpoint_grpc_{code.name.lower()}", f"gRPC {code.name}")
