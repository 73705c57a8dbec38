"""Answers for images the admission policy refuses (xrayops.dicom.admission).

A refused image is answered, not dropped and not failed: `applicable` false, the reason, and no
region. Kept free of torch so that the DICOM transformer can use it.
"""
from __future__ import annotations

from xrayops.contracts import InferenceResponse
from xrayops.dicom.admission import Admission


def not_applicable(admission: Admission, model_name: str, version: str) -> InferenceResponse:
    """The answer for an image the admission policy refuses: the reason, and no region."""
    return InferenceResponse(
        region=None, confidence=None, applicable=False, refusal_reason=admission.reason,
        refusal_detail=admission.detail, model_name=model_name, model_version=version,
    )


def with_refusals(answered: list, refusals: dict[int, InferenceResponse]) -> list:
    """The answers of the admitted images with the refused ones put back at their request positions."""
    answers = iter(answered)
    return [refusals[i] if i in refusals else next(answers) for i in range(len(answered) + len(refusals))]
