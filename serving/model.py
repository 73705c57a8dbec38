"""The KServe predictor: one verified model bundle, or several averaged as an ensemble
(`xrayops.ensemble`, Langer et al. 2024), behind kserve's `Model` interface.

preprocess turns the request into an `ImageBatch`: DICOM goes through the transformer's
decode (`serving.transformer.RequestDecoder`, the same code the cluster's transformer pod runs),
pixel tensors are checked against the spec. predict queues the images on a micro-batcher
(concurrent requests share one forward pass), adds Grad-CAM and the upright-turned image
(Baltruschat et al. 2018) when asked, appends one `InferenceLogRecord` per image to the local inference log
(`xrayops.inference_log.build_records`; off on a cluster, where the payload logger feeds
serving/log_sink.py), and answers in the protocol the request came in, with the embedding as an
extra v2 output when asked (the transformer asks, so the logged response carries it) and each image's
DICOM Structured Report when asked (`sr`, DICOM requests only: xrayops.results.sr). Bad input
raises kserve's `InvalidInput` (or a subclass with a more specific HTTP status, `serving.errors`),
which the server turns into a 4xx with the message.
"""
from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from kserve import Model
from kserve.errors import InvalidInput
from prometheus_client import Counter

from serving.batcher import MicroBatcher
from serving.schema import ImageBatch, ServedResponse, encode_v1, encode_v2, input_types, output_types
from serving.transformer import DecodeLimits, RequestDecoder
from xrayops.bundle import BundleError, LoadedBundle, load_bundle
from xrayops.data.dataset import to_unit_float
from xrayops.ensemble import EnsembleError, check_members, ensemble_version, predict_ensemble
from xrayops.gradcam import grad_cam, heatmap_png_base64
from xrayops.upright import upright_image
from xrayops.inference import InferenceInputError, model_version, validate_array
from xrayops.inference_log import build_records, sanitize_image_meta
from xrayops.log_buffer import LogBuffer
from xrayops.refusals import not_applicable, with_refusals
from xrayops.release.storage import release_of_folders
from xrayops.results.identity import AlgorithmIdentity, identity_of
from xrayops.results.sr import SRError, image_srs
from xrayops.logs import get_logger
from xrayops.train.runtime import resolve_device

log = get_logger(__name__)

IMAGES = Counter("xrayops_images_total", "Images predicted", ["model", "region"])
LABEL_DISAGREEMENTS = Counter("xrayops_label_disagreements_total", "Confident predictions against the DICOM tag", ["model"])
OOD_IMAGES = Counter("xrayops_ood_images_total", "Images flagged out of domain", ["model"])
# image_meta fields a request sent in no known format (xrayops.inference_log.sanitize_image_meta):
# dropped before the log, counted by field name; the value is never logged.
IMAGE_META_REJECTED = Counter("xrayops_image_meta_rejected_total", "image_meta fields dropped as not in a known format",
                              ["model", "field"])


class XrayModel(Model):
    def __init__(
        self,
        name: str,
        bundle_dir: str | Path | Sequence[str | Path],
        log_path: str | Path | None = None,
        version: str | None = None,
        device: str = "auto",
        limits: DecodeLimits | None = None,
        deid_key: str | None = None,
        max_batch_size: int = 32,
        max_batch_latency_ms: float = 5.0,
        log_flush_records: int = 512,
        log_flush_seconds: float = 10.0,
    ) -> None:
        super().__init__(name)
        dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
        self.bundle_dirs = [Path(d) for d in dirs]
        self.bundle_dir = self.bundle_dirs[0]
        self.log_path = Path(log_path) if log_path is not None else None
        self.log_flush = (log_flush_records, log_flush_seconds)
        self.log_buffer: LogBuffer | None = None
        self.device = device
        self.version = version or ""  # default: the weights' content hash (ensemble: over members), set by load()
        self.limits = limits or DecodeLimits()
        self.deid_key = deid_key
        self.max_batch_size, self.max_batch_latency_s = max_batch_size, max_batch_latency_ms / 1000.0
        self.members: list[LoadedBundle] = []
        self.bundle: LoadedBundle | None = None  # the first member: its spec and classes are every member's
        self.decoder: RequestDecoder | None = None
        self.batcher: MicroBatcher | None = None
        self.load_error = ""
        self.release = ""  # the serving release the bundles came from (xrayops.release), if any
        self.identity: AlgorithmIdentity | None = None  # who answers, as an SR's Algorithm Identification says

    def load(self) -> bool:
        """Load and verify every member; on any failure stay not-ready and keep the reason."""
        if not self.bundle_dirs:
            self.ready, self.load_error = False, "no model bundle given"
            return False
        try:
            device = resolve_device(self.device)
            members = [load_bundle(d, device=device) for d in self.bundle_dirs]
            check_members([m.meta for m in members])
            release = release_of_folders(self.bundle_dirs, [m.meta for m in members])
            if self.log_path is not None:
                self.log_path.mkdir(parents=True, exist_ok=True)
                self.log_buffer = self.log_buffer or LogBuffer(self.log_path, *self.log_flush)
        # RuntimeError: CUDA asked for, none present; ReleaseError is one too (folders not the release's)
        except (BundleError, EnsembleError, RuntimeError, OSError) as exc:
            self.members, self.bundle, self.ready, self.load_error, self.release = [], None, False, str(exc), ""
            log.error("model not ready", model=self.name, bundles=[str(d) for d in self.bundle_dirs], error=str(exc))
            return False
        if self.deid_key is None:
            from xrayops.config import get_settings
            from xrayops.dicom.deid import DeidKeyError, require_key

            try:
                self.deid_key = require_key(get_settings())
            except DeidKeyError:  # a cluster predictor gets pixels; a DICOM sent to it is refused
                self.deid_key = None
        self.members, self.bundle, self.load_error = members, members[0], ""
        self.release = release.release_id if release is not None else ""
        self.version = self.version or ensemble_version([model_version(m) for m in members])
        self.identity = identity_of(self.name, self.version, [m.meta for m in members], release)
        self.decoder = RequestDecoder(self.bundle.meta.preprocessing, self.limits, self.deid_key)
        self.batcher = MicroBatcher(self._predict_items, self.max_batch_size, self.max_batch_latency_s)
        self.ready = True
        log.info("model ready", model=self.name, version=self.version, members=len(members))
        return True

    def start(self) -> None:
        # kserve's default start() marks any model ready; only a loaded bundle is.
        self.ready = self.bundle is not None

    def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            self.batcher.close()
        if self.log_buffer is not None:  # SIGTERM comes here: what is buffered is written, not lost
            self.log_buffer.close()

    def member_info(self) -> list[dict]:
        return [
            {"version": model_version(m), "path": str(d), "bundle": m.meta.model_dump(mode="json")}
            for m, d in zip(self.members, self.bundle_dirs)
        ]

    def bundle_info(self) -> dict:
        """Served version plus every member's metadata: lineage, classes, preprocessing spec."""
        meta = self.bundle.meta if self.bundle is not None else None
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "ready": self.ready,
            "bundle": meta.model_dump(mode="json") if meta is not None else None,
            "members": self.member_info(),
        }

    def get_input_types(self) -> list[dict]:
        return input_types(self.bundle.meta.preprocessing.size) if self.bundle is not None else []

    def get_output_types(self) -> list[dict]:
        if self.bundle is None:
            return []
        meta = self.bundle.meta
        findings = sorted({name for m in self.members for name in m.meta.binary_heads})
        return output_types(len(meta.classes), meta.ood_threshold is not None, findings)

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> ImageBatch:
        # Decoding a large DICOM is CPU work: off the event loop, so health checks stay quick.
        batch = await asyncio.get_running_loop().run_in_executor(None, self.decoder, payload, headers)
        size = self.bundle.meta.preprocessing.size
        try:
            for i, array in enumerate(batch.pixels):
                validate_array(i, array, size)
        except InferenceInputError as exc:
            raise InvalidInput(f"image {exc.index} cannot be predicted: {exc.reason}") from exc
        if batch.upright and not any(m.meta.orientation for m in self.members):
            raise InvalidInput(
                f"parameter 'upright' needs an orientation head (Baltruschat et al. 2018); model {self.name} has none"
            )
        return batch

    def validate(self, payload):
        # preprocess has already checked the request against this model's schema.
        return payload

    async def predict(self, payload: ImageBatch, headers: dict[str, str] | None = None, response_headers=None):
        responses: list[ServedResponse] = []
        embeddings = np.zeros((0, self.bundle.meta.embedding_dim), dtype=np.float32)
        if payload.pixels:  # a request of refused images only has nothing to predict
            answers = await self.batcher.submit(list(zip(payload.pixels, payload.dicom_regions)))
            responses = [ServedResponse(**r.model_dump()) for r, _ in answers]
            embeddings = np.stack([e for _, e in answers])
            loop = asyncio.get_running_loop()
            if payload.gradcam:
                responses = await loop.run_in_executor(None, self.add_gradcam, payload.pixels, responses)
            if payload.upright:
                responses = [add_upright(p, r) for p, r in zip(payload.pixels, responses)]
            await loop.run_in_executor(None, self.log_batch, payload, responses, embeddings)
            self.count(responses)
        if payload.refusals:
            refused = {i: ServedResponse(**not_applicable(a, self.name, self.version).model_dump())
                       for i, a in payload.refusals.items()}  # fmt: skip
            answered_rows = iter(range(len(responses)))
            rows = [None if i in refused else next(answered_rows) for i in range(len(responses) + len(refused))]
            responses = with_refusals(responses, refused)
            nan_row = np.full(embeddings.shape[1], np.nan, dtype=np.float32)
            embeddings = np.stack([nan_row if r is None else embeddings[r] for r in rows])
        if payload.protocol == "v1":
            return encode_v1(responses)
        srs = None
        if payload.sr:  # the DICOM path only (schema.decode_v2): the source headers are in the batch
            try:
                srs = await asyncio.get_running_loop().run_in_executor(
                    None, image_srs, payload.sources, responses, self.identity)  # fmt: skip
            except SRError as exc:
                raise InvalidInput(f"cannot make the Structured Report of {exc}") from None
        return encode_v2(responses, self.bundle.meta.classes, self.name, self.version, payload,
                         embeddings if payload.embedding else None, srs=srs)

    def _predict_items(self, items: list[tuple[np.ndarray, str]]) -> list:
        """One forward pass (per member) over images from any number of requests."""
        arrays = [a for a, _ in items]
        regions = [r for _, r in items]
        responses, embeddings = predict_ensemble(self.members, arrays, regions, self.name, self.version)
        return list(zip(responses, embeddings))

    def add_gradcam(self, pixels: list[np.ndarray], responses: list[ServedResponse]) -> list[ServedResponse]:
        """Grad-CAM of the predicted class, averaged over members (each member's own backbone)."""
        classes = self.bundle.meta.classes
        targets = [classes.index(r.region) for r in responses]
        maps = []
        for member in self.members:
            images = torch.stack([to_unit_float(p) for p in pixels]).unsqueeze(1).to(member.device)
            maps.append(grad_cam(member.model, images, targets))
        heatmaps = np.mean(maps, axis=0)
        # Each member's map is scaled to [0, 1]; scale their mean again so the peak is 1.
        peaks = heatmaps.reshape(len(heatmaps), -1).max(axis=1)
        heatmaps = heatmaps / np.maximum(peaks, 1e-12)[:, None, None]
        return [r.model_copy(update={"gradcam_png": heatmap_png_base64(h)}) for r, h in zip(responses, heatmaps)]

    def log_batch(self, batch: ImageBatch, responses: list[ServedResponse], embeddings: np.ndarray) -> None:
        metas = None
        if batch.image_meta:  # a client's header fields: only known formats reach the log (never the rest)
            checked = [sanitize_image_meta(m) for m in batch.image_meta]
            rejected = Tally(f for c in checked for f in c.rejected)
            for name, n in rejected.items():
                IMAGE_META_REJECTED.labels(self.name, name).inc(n)
            if rejected:
                log.warning("image_meta.rejected", model=self.name, fields=dict(sorted(rejected.items())))
            metas = [c.fields for c in checked]
        if self.log_buffer is None:
            return
        self.log_buffer.add(build_records(responses, batch.pixels, embeddings, batch.request_id, metas))

    def count(self, responses: list[ServedResponse]) -> None:
        for r in responses:
            IMAGES.labels(self.name, r.region).inc()
            if r.label_disagreement:
                LABEL_DISAGREEMENTS.labels(self.name).inc()
            if r.ood:
                OOD_IMAGES.labels(self.name).inc()


def add_upright(pixels: np.ndarray, response: ServedResponse) -> ServedResponse:
    """The response plus the image turned upright by its predicted angle (Baltruschat et al. 2018), as a PNG."""
    if response.orientation_deg is None:  # a member without an orientation head answered alone
        return response
    image = upright_image(to_unit_float(pixels).numpy(), response.orientation_deg)
    return response.model_copy(update={"upright_png": heatmap_png_base64(image)})
