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
    md5): paired-bootstrap CI of the accuracy difference; with `promote`, a challenger that is not
    worse beyond `margin` and answers everything the champion did gets the champion alias."""
    from collections import namedtuple
    from pathlib import Path

    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.config import get_settings
    from xrayops.evaluate.gate import gate, gate_and_promote, lost_outputs, refuse, score_bundle
    from xrayops.registry import parse_model_ref

    tracking_uri = tracking_uri or get_settings().tracking_uri()
    data_dir = Path(dataset.path)
    scored = [score_bundle(Path(champion.path), data_dir, test_set, champion_uri),
              score_bundle(Path(challenger.path), data_dir, test_set, challenger_uri)]
    lost = lost_outputs(read_bundle_meta(Path(champion.path)), read_bundle_meta(Path(challenger.path)))
    kwargs = dict(margin=margin, samples=bootstrap_samples, confidence=confidence)
    if promote:
        target = parse_model_ref(challenger_uri)
        result = gate_and_promote(*scored, tracking_uri, target.name, target.version, alias=alias, lost=lost, **kwargs)
    else:
        result = refuse(gate(*scored, **kwargs), lost)
    Path(decision.path).write_text(result.model_dump_json(indent=2))
    decision.metadata.update({"promote": result.promote, "difference": result.difference, "ci_low": result.ci_low,
                              "ci_high": result.ci_high, "n": result.n, "test_set": result.test_set})
    promoted = bool(promote and result.promote)
    return namedtuple("GateOut", ["promoted", "reason"])(promoted, result.reason)
