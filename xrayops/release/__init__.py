"""Serving releases: registry versions published as immutable ensemble folders, and the
InferenceService pointed at one (rollout) or back (rollback)."""
from xrayops.release.plan import Release, ReleaseError, ReleaseMember, point_inference_service
from xrayops.release.publish import ReleaseResult, release_models, roll_back

__all__ = ["Release", "ReleaseError", "ReleaseMember", "ReleaseResult", "point_inference_service",
           "release_models", "roll_back"]
