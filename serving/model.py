"""The KServe predictor: a verified model bundle behind kserve's `Model` interface.

preprocess parses the request (DICOM files or pixel tensors), predict runs
`xrayops.inference` and appends one `InferenceLogRecord` per image to the inference log,
and the answer goes back in the protocol it came in. Bad input raises kserve's
`InvalidInput`, which the server turns into a 400 with the message.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from kserve import InferRequest, Model
from kserve.errors import InvalidInput

from serving.schema import DecodedRequest, decode_v1, decode_v2, encode_v1, encode_v2, input_types, output_types
from xrayops.bundle import BundleError, LoadedBundle, load_bundle
from xrayops.inference import InferenceInputError, model_version, predict_arrays, predict_datasets
from xrayops.inference_log import append_records, records_for_arrays
from xrayops.logs import get_logger
from xrayops.train.runtime import resolve_device

log = get_logger(__name__)


class XrayModel(Model):
    def __init__(
        self,
        name: str,
        bundle_dir: str | Path,
        log_path: str | Path | None = None,
        version: str | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.log_path = Path(log_path) if log_path is not None else None
        self.device = device
        self.version = version or ""  # default: the weights' content hash, set by load()
        self.bundle: LoadedBundle | None = None
        self.load_error = ""

    def load(self) -> bool:
        """Load and verify the bundle; on any failure stay not-ready and keep the reason."""
        try:
            bundle = load_bundle(self.bundle_dir, device=resolve_device(self.device))
            if self.log_path is not None:
                self.log_path.mkdir(parents=True, exist_ok=True)
        except (BundleError, RuntimeError, OSError) as exc:  # RuntimeError: CUDA asked for, none present
            self.bundle, self.ready, self.load_error = None, False, str(exc)
            log.error("model not ready", model=self.name, bundle=str(self.bundle_dir), error=self.load_error)
            return False
        self.bundle, self.load_error = bundle, ""
        self.version = self.version or model_version(bundle)
        self.ready = True
        log.info("model ready", model=self.name, version=self.version, bundle=str(self.bundle_dir))
        return True

    def start(self) -> None:
        # kserve's default start() marks any model ready; only a loaded bundle is.
        self.ready = self.bundle is not None

    def stop(self) -> None:
        self.ready = False

    def bundle_info(self) -> dict:
        """Served version plus the bundle's metadata: lineage, classes, preprocessing spec."""
        meta = self.bundle.meta if self.bundle is not None else None
        return {
            "name": self.name,
            "version": self.version,
            "ready": self.ready,
            "bundle": meta.model_dump(mode="json") if meta is not None else None,
        }

    def get_input_types(self) -> list[dict]:
        return input_types(self.bundle.meta.preprocessing.size) if self.bundle is not None else []

    def get_output_types(self) -> list[dict]:
        if self.bundle is None:
            return []
        meta = self.bundle.meta
        return output_types(len(meta.classes), with_ood_flag=meta.ood_threshold is not None)

    def preprocess(self, payload, headers: dict[str, str] | None = None) -> DecodedRequest:
        headers = headers or {}
        if isinstance(payload, InferRequest):
            request_id = payload.id or headers.get("x-request-id") or uuid.uuid4().hex
            return decode_v2(payload, self.bundle.meta.preprocessing.size, request_id)
        return decode_v1(payload, headers.get("x-request-id") or uuid.uuid4().hex)

    def validate(self, payload):
        # preprocess has already checked the request against this model's schema.
        return payload

    async def predict(self, payload: DecodedRequest, headers: dict[str, str] | None = None, response_headers=None):
        # Inference is CPU/GPU work: keep the event loop free for health checks meanwhile.
        responses = await asyncio.get_running_loop().run_in_executor(None, self.infer, payload)
        if payload.protocol == "v1":
            return encode_v1(responses)
        return encode_v2(responses, self.bundle.meta.classes, self.name, self.version, payload)

    def infer(self, decoded: DecodedRequest):
        """Predict a decoded request and log every image."""
        try:
            if decoded.pixels is not None:
                responses, embeddings = predict_arrays(self.bundle, list(decoded.pixels), version=self.version)
                records = records_for_arrays(responses, decoded.pixels, embeddings, decoded.request_id)
            else:
                responses, records = predict_datasets(
                    self.bundle, decoded.datasets, decoded.request_id, version=self.version
                )
        except InferenceInputError as exc:
            raise InvalidInput(f"image {exc.index} cannot be predicted: {exc.reason}") from exc
        if self.log_path is not None:
            append_records(self.log_path, records)
        return responses
