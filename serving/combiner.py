"""The ensemble combiner for an InferenceGraph whose members scale apart.

On a cluster each member (SimCLR, BYOL, SupCon) can run as its own InferenceService; an
InferenceGraph `Ensemble` node sends the request to all of them and returns one JSON object
keyed by step name, `{"simclr": {"predictions": [...]}, "byol": {...}, ...}`. This kserve Model
is the next step of the graph: it averages those answers with `xrayops.ensemble` (the same code
the one-process ensemble uses) and answers in v1 form. It reads the members' bundle.json
(verified) for their classes and thresholds; it loads no weights.
"""
from __future__ import annotations

from pathlib import Path

from kserve import Model
from kserve.errors import InvalidInput
from pydantic import ValidationError

from serving.schema import encode_v1
from xrayops.bundle_meta import verify_bundle
from xrayops.contracts import InferenceResponse, ModelBundleMeta
from xrayops.ensemble import EnsembleError, check_members, combine_responses, ensemble_version


def member_answers(body, n_members: int) -> list[list[InferenceResponse]]:
    """The Ensemble router's object, steps in name order, as one list of responses per member."""
    if not isinstance(body, dict) or len(body) != n_members:
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise InvalidInput(f"expected the answers of {n_members} ensemble members keyed by step name, got {got}")
    answers = []
    for step in sorted(body):
        predictions = body[step].get("predictions") if isinstance(body[step], dict) else None
        if not isinstance(predictions, list):
            raise InvalidInput(f"step '{step}' holds no v1 'predictions' list")
        try:
            answers.append([InferenceResponse.model_validate(p) for p in predictions])
        except ValidationError as exc:
            raise InvalidInput(f"step '{step}' is not an xrayops answer: {exc.errors()[0]['msg']}") from exc
    return answers


class EnsembleCombiner(Model):
    def __init__(self, name: str, bundle_dirs: list[str | Path]) -> None:
        super().__init__(name)
        self.bundle_dirs = [Path(d) for d in bundle_dirs]
        self.metas: list[ModelBundleMeta] = []
        self.version = ""
        self.load_error = ""

    def load(self) -> bool:
        try:
            metas = [verify_bundle(d) for d in self.bundle_dirs]
            check_members(metas)
        except (EnsembleError, RuntimeError, OSError) as exc:
            self.ready, self.load_error = False, str(exc)
            return False
        self.metas = metas
        self.version = ensemble_version([m.weights_sha256[:12] for m in metas])
        self.ready = True
        return True

    def validate(self, payload):
        return payload

    async def predict(self, payload, headers=None, response_headers=None) -> dict:
        try:
            combined = combine_responses(member_answers(payload, len(self.metas)), self.metas, self.name, self.version)
        except EnsembleError as exc:
            raise InvalidInput(str(exc)) from exc
        return encode_v1(combined)
