from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def gate_op(
    dataset: Input[Dataset],
    champion: Input[Model],
    champion_uri: str,
    challenger: Input[Model],
    challenger_uri: str,
    test_set: str,
    tracking_uri: str,
    margin: float,
    bootstrap_samples: int,
    confidence: float,
    promote: bool,
    alias: str,
    decision: Output[Artifact],
) -> NamedTuple("GateOut", [("promoted", bool), ("reason", str)]):
    """Champion/challenger gate on the test split of the new dataset version (`test_set`, its DVC
    md5): paired-bootstrap CI (over studies) of the accuracy difference, overall and per acquisition
    subgroup (XRAYOPS_GATE_SUBGROUP_MIN_N / _MARGIN); with `promote`, a challenger that is not worse
    beyond `margin` anywhere and answers everything the champion did gets the champion alias."""
    from collections import namedtuple
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.evaluate.gate import GateModel, GatePolicy, run_gate

    settings = get_settings()
    policy = GatePolicy(margin=margin, samples=bootstrap_samples, confidence=confidence, promote=promote, alias=alias,
                        subgroup_min_n=settings.gate_subgroup_min_n, subgroup_margin=settings.gate_subgroup_margin)
    result = run_gate(GateModel(bundle_dir=champion.path, ref=champion_uri),
                      GateModel(bundle_dir=challenger.path, ref=challenger_uri),
                      Path(dataset.path), test_set, policy, tracking_uri or settings.tracking_uri())
    Path(decision.path).write_text(result.model_dump_json(indent=2))
    decision.metadata.update({"promote": result.promote, "difference": result.difference, "ci_low": result.ci_low,
                              "ci_high": result.ci_high, "n": result.n, "n_studies": result.n_studies,
                              "test_set": result.test_set,
                              "refused_subgroups": [f"{g.attribute}={g.value}" for g in result.refused_subgroups]})
    promoted = bool(promote and result.promote)
    return namedtuple("GateOut", ["promoted", "reason"])(promoted, result.reason)
