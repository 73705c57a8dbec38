"""The change record of a candidate model: what changed, why, the evidence, and the approval.

One page a quality officer can read, print and sign (the FDA's predetermined change control
plan asks for a described modification, performance evidence per change and traceable sign-off;
the EU AI Act, Article 12, for records of a high-risk system's changes):

- what changed: the dataset versions and their diff (images added/removed by site and vendor,
  tags changed, reviewers' label corrections by reason), the code commits, the model
  configuration (bundle fields that differ);
- why: the retraining trigger's record (drift and label-noise evidence) with the dashboard link;
- the evidence: the gate's decision with its subgroup table, both models' metrics with study-
  bootstrap intervals, calibration and out-of-domain rate;
- the approval block: the registry's decision for the release, or "awaiting approval" and how to
  give it, plus lines for a wet signature on paper.

Written as change_record.json (the typed ChangeRecord) and change_record.html (Jinja2,
xrayops/templates/change_record.html.j2), which headless Chromium prints to PDF.
"""
from __future__ import annotations

import hashlib
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from xrayops.contracts import ModelBundleMeta
from xrayops.evaluate.gate import GateDecision
from xrayops.evaluate.intervals import HEADLINE
from xrayops.evaluate.metrics import EvaluationMetrics
from xrayops.logs import get_logger
from xrayops.release.approval import ApprovalStatus
from xrayops.release.dataset_diff import DatasetDiff, LabelCorrections
from xrayops.release.plan import Release

log = get_logger(__name__)

RECORD_JSON, RECORD_HTML, RECORD_PDF = "change_record.json", "change_record.html", "change_record.pdf"
# Bundle fields that differ by construction between any two models, not by a configuration change.
_NOT_CONFIG = {"weights_sha256", "created_at", "lineage.metrics"}


class TriggerEvidence(BaseModel):
    """Why the run started: the trigger's decision (xrayops.monitor.trigger), or only the window and
    reasons a run was launched with."""

    window_id: str = ""
    decided_at: datetime | None = None
    action: str = ""
    run_id: str = ""
    model_version: str = ""
    reasons: list[str] = Field(default_factory=list)
    drift_share: float | None = None
    drifted_columns: list[str] = Field(default_factory=list)
    label_noise_rate: float | None = None
    reference_label_noise_rate: float | None = None
    n_judged: int | None = None
    ood_rate: float | None = None
    dashboard_url: str = ""


class ConfigChange(BaseModel):
    field: str
    champion: str
    challenger: str


class CodeVersions(BaseModel):
    champion_commit: str = ""
    challenger_commit: str = ""
    champion_run: str = ""
    challenger_run: str = ""
    xrayops_version: str = ""
    image: str = ""  # the container image the pipeline's steps ran (XRAYOPS_IMAGE)


class ModelEvidence(BaseModel):
    ref: str
    evaluation: EvaluationMetrics


class ChangeRecord(BaseModel):
    record_id: str
    created_at: datetime
    champion: ModelEvidence
    challenger: ModelEvidence
    gate: GateDecision
    code: CodeVersions
    config: list[ConfigChange]
    dataset: DatasetDiff | None = None
    dataset_note: str = ""  # why there is no diff, when there is none
    corrections: LabelCorrections | None = None
    trigger: TriggerEvidence | None = None
    release: Release | None = None  # the candidate release, once published
    approval: ApprovalStatus | None = None
    requires_approval: bool = False


# --- pieces ---


def trigger_evidence(audit_log: Path | None = None, window: str = "", reasons: str = "",
                     dashboard_url: str = "") -> TriggerEvidence | None:
    """The launched decision for `window` (the latest launched one without it) from the trigger's
    JSONL audit log; else what the run was launched with; None for a run started by hand."""
    from xrayops.monitor.trigger import AuditLog

    if audit_log is not None and Path(audit_log).is_file():
        launched = [d for d in AuditLog(audit_log).read() if d.action == "launched"]
        chosen = [d for d in launched if d.window_id == window] if window else launched[-1:]
        if chosen:
            d, s = chosen[-1], chosen[-1].signals
            return TriggerEvidence(
                window_id=d.window_id, decided_at=d.decided_at, action=d.action, run_id=d.run_id,
                model_version=d.model_version, reasons=d.reasons, drift_share=s.drift_share,
                drifted_columns=s.drifted_columns, label_noise_rate=s.label_noise_rate,
                reference_label_noise_rate=s.reference_label_noise_rate, n_judged=s.n_judged, ood_rate=s.ood_rate,
                dashboard_url=dashboard_url)
    if window or reasons:
        return TriggerEvidence(window_id=window, reasons=[r for r in reasons.split("; ") if r],
                               dashboard_url=dashboard_url)
    return None


def _flat(prefix: str, value, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


def config_diff(champion: ModelBundleMeta, challenger: ModelBundleMeta) -> list[ConfigChange]:
    """The bundle fields (architecture, method, preprocessing, heads, thresholds, lineage) that
    differ: what the training configuration changed."""
    a = _flat("", champion.model_dump(mode="json"), {})
    b = _flat("", challenger.model_dump(mode="json"), {})
    fields = sorted(k for k in set(a) | set(b) if not any(k == n or k.startswith(n + ".") for n in _NOT_CONFIG))
    return [ConfigChange(field=k, champion=a.get(k, ""), challenger=b.get(k, "")) for k in fields if a.get(k) != b.get(k)]


def code_versions(champion: ModelBundleMeta, challenger: ModelBundleMeta, image: str = "") -> CodeVersions:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("xrayops")
    except PackageNotFoundError:
        ours = ""
    return CodeVersions(champion_commit=champion.lineage.git_commit, challenger_commit=challenger.lineage.git_commit,
                        champion_run=champion.lineage.pipeline_run, challenger_run=challenger.lineage.pipeline_run,
                        xrayops_version=ours, image=image)


def record_id(challenger_ref: str, test_set: str, created_at: datetime) -> str:
    digest = hashlib.sha256(f"{challenger_ref}\n{test_set}\n{created_at.isoformat()}".encode()).hexdigest()
    return "cr-" + digest[:12]


# --- the page ---


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(ci) -> str:
    return "n/a" if ci is None else ci.format()


def _evidence_tables(record: ChangeRecord) -> dict:
    """Overall metrics with intervals side by side, calibration and OOD, per-class recall."""
    sides = {"champion": record.champion.evaluation, "challenger": record.challenger.evaluation}
    tables = {s: e.table() for s, e in sides.items()}
    reference = "the true regions" if tables["challenger"] is not None and record.challenger.evaluation.vs_truth else "the PACS tags"
    rows = [[name.replace("_", " "), *(_ci(t.ci(name)) if t is not None else "" for t in tables.values())]
            for name in HEADLINE]
    rows.append(["images / studies", *(f"{t.n} / {t.intervals.n_studies}" if t is not None and t.intervals else ""
                                       for t in tables.values())])
    overall = {"header": ["metric (95 % CI, bootstrap over studies)", "champion", "challenger"], "rows": rows,
               "note": f"Test split of dataset version {record.gate.test_set}, scored against {reference}."}
    calibration_rows = []
    for label, key in (("ECE after temperature scaling", "ece"), ("ECE before temperature scaling", "ece_uncalibrated"),
                       ("negative log-likelihood", "nll")):
        calibration_rows.append([label, *(_num(getattr(t, key, None)) if t is not None else "" for t in tables.values())])
    for label, key in (("out-of-domain rate (share flagged)", "ood_rate"), ("OOD AUROC vs truth", "ood_auroc"),
                       ("label-disagreement rate", "label_disagreement_rate")):
        calibration_rows.append([label, *(_num(getattr(e, key, None) if key != "ood_auroc" else (e.model_extra or {}).get(key))
                                          for e in sides.values())])
    calibration = {"header": ["measure", "champion", "challenger"], "rows": calibration_rows}
    classes = sorted({c for t in tables.values() if t is not None and t.intervals for c in t.intervals.per_class_recall})
    per_class = {"header": ["class (recall, 95 % CI)", "champion", "challenger"], "rows": [
        [c, *(_ci(t.intervals.per_class_recall.get(c)) if t is not None and t.intervals else "" for t in tables.values())]
        for c in classes]}
    return {"overall": overall, "calibration": calibration, "per_class": per_class}


def _gate_tables(gate: GateDecision) -> dict:
    summary = {"header": ["", "value"], "text_columns": [1], "rows": [
        ["decision", "promote" if gate.promote else "keep the champion"],
        ["test set (DVC md5)", gate.test_set],
        ["images / studies", f"{gate.n} / {gate.n_studies or gate.n}"],
        ["champion accuracy", _num(gate.champion_accuracy)],
        ["challenger accuracy", _num(gate.challenger_accuracy)],
        [f"difference, {gate.confidence:.0%} CI (paired bootstrap over studies)",
         f"{gate.difference:+.3f} [{gate.ci_low:+.3f}, {gate.ci_high:+.3f}]"],
        ["non-inferiority margin (overall / subgroup)", f"{gate.margin:.3f} / {gate.subgroup_margin:.3f}"],
        ["subgroups decided on", f"n >= {gate.subgroup_min_n} images"],
        ["outputs the challenger lacks", ", ".join(gate.lost) or "none"],
        ["reason", gate.reason],
    ]}
    rows, marked = [], []
    for i, g in enumerate(gate.subgroups):
        d = g.difference
        rows.append([g.attribute.replace("_", " "), g.value, str(g.n), str(g.n_studies), _num(g.champion_accuracy),
                     _num(g.challenger_accuracy),
                     f"{d.value:+.3f}" + (f" [{d.low:+.3f}, {d.high:+.3f}]" if d.low is not None else ""),
                     "refused" if g.refused else "passed" if g.checked else "too few images"])
        if g.refused:
            marked.append(i)
    subgroups = {"header": ["attribute", "value", "images", "studies", "champion", "challenger",
                            "difference (95 % CI)", "verdict"], "rows": rows, "marked": marked, "text_columns": [0, 1, 7]}
    return {"summary": summary, "subgroups": subgroups}


def _subgroup_accuracy_table(record: ChangeRecord) -> dict:
    """The challenger's accuracy per subgroup against the evaluation's reference (truth if known)."""
    champion, challenger = record.champion.evaluation.table(), record.challenger.evaluation.table()
    theirs = {(g.attribute, g.value): g for g in (champion.subgroups if champion else [])}
    rows = []
    for g in challenger.subgroups if challenger else []:
        other = theirs.get((g.attribute, g.value))
        rows.append([g.attribute.replace("_", " "), g.value, str(g.n), str(g.n_studies),
                     _ci(other.accuracy) if other else "", _ci(g.accuracy)])
    return {"header": ["attribute", "value", "images", "studies", "champion accuracy (95 % CI)",
                       "challenger accuracy (95 % CI)"], "rows": rows, "text_columns": [0, 1]}


def render_change_record(record: ChangeRecord) -> str:
    from xrayops.templating import render

    dataset = record.dataset
    breakdown = []
    if dataset is not None:
        for what, counts in (("added", dataset.added_by), ("removed", dataset.removed_by)):
            for column, values in counts.items():
                for value, n in values.items():
                    breakdown.append([what, column, value, str(n)])
    verdict = ("ok", "approved") if record.approval and record.approval.state == "approved" else (
        ("no", "rejected") if record.approval and record.approval.state == "rejected" else ("wait", "awaiting approval"))
    return render(
        "change_record.html.j2", title=f"Change record {record.record_id}", r=record, verdict=verdict,
        gate=_gate_tables(record.gate), evidence=_evidence_tables(record), subgroup_accuracy=_subgroup_accuracy_table(record),
        breakdown={"header": ["images", "by", "value", "n"], "rows": breakdown, "text_columns": [0, 1, 2]},
        corrections={"header": ["PACS tag", "label trained on", "images"], "text_columns": [0, 1], "rows": [
            [t.from_label, t.to_label, str(t.n)] for t in record.corrections.transitions]} if record.corrections else None,
        config={"header": ["field", "champion", "challenger"], "text_columns": [0, 1, 2],
                "rows": [[c.field, c.champion, c.challenger] for c in record.config]},
        pct=_pct, num=_num,
    )


def write_change_record(record: ChangeRecord, out_dir: Path) -> tuple[Path, Path]:
    """change_record.json and change_record.html in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / RECORD_JSON, out_dir / RECORD_HTML
    json_path.write_text(record.model_dump_json(indent=2))
    html_path.write_text(render_change_record(record), encoding="utf-8")
    log.info("change record written", record=record.record_id, html=str(html_path))
    return json_path, html_path


class PrintResult(BaseModel):
    pdf: Path
    console: list[str]  # the page's console messages (errors included); a clean page has none


def print_pdf(html_path: Path, pdf_path: Path, chromium: str | None = None, timeout: float = 120.0) -> PrintResult:
    """The page printed to PDF by headless Chromium, with what it wrote to its console."""
    from xrayops.monitor.ui import CHROMIUM_NAMES, find_chromium

    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); apt-get install chromium")
    pdf_path = Path(pdf_path).resolve()
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xrayops-chromium-") as profile:
        done = subprocess.run(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             "--no-pdf-header-footer", f"--print-to-pdf={pdf_path}", Path(html_path).resolve().as_uri()],
            capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0 or not pdf_path.is_file():
        raise RuntimeError(f"chromium --print-to-pdf failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    console = [line for line in done.stderr.decode("utf-8", "replace").splitlines() if ":CONSOLE" in line]
    return PrintResult(pdf=pdf_path, console=console)


def assemble(
    champion_ref: str, champion_meta: ModelBundleMeta, champion_eval: EvaluationMetrics,
    challenger_ref: str, challenger_meta: ModelBundleMeta, challenger_eval: EvaluationMetrics, gate: GateDecision,
    dataset: DatasetDiff | None = None, dataset_note: str = "", corrections: LabelCorrections | None = None,
    trigger: TriggerEvidence | None = None, release: Release | None = None, approval: ApprovalStatus | None = None,
    requires_approval: bool = False, image: str = "", now: datetime | None = None,
) -> ChangeRecord:
    """The record from its parts (pure: every input already computed)."""
    now = now or datetime.now(timezone.utc)
    return ChangeRecord(
        record_id=record_id(challenger_ref, gate.test_set, now), created_at=now,
        champion=ModelEvidence(ref=champion_ref, evaluation=champion_eval),
        challenger=ModelEvidence(ref=challenger_ref, evaluation=challenger_eval), gate=gate,
        code=code_versions(champion_meta, challenger_meta, image), config=config_diff(champion_meta, challenger_meta),
        dataset=dataset, dataset_note=dataset_note, corrections=corrections, trigger=trigger, release=release,
        approval=approval, requires_approval=requires_approval,
    )


class ChangeInputs(BaseModel):
    """What a change record is made from: both models, the versioned test data, and optionally the
    gate's decision (else the gate is run without promoting), the previous dataset version's
    manifest (else read from the DVC remote by the champion's dataset md5), the training labels
    (for reviewers' corrections), the trigger, the candidate release and its approval."""

    champion_bundle: Path
    champion_ref: str
    challenger_bundle: Path
    challenger_ref: str
    data_dir: Path
    test_set: str  # the DVC md5 of the dataset at data_dir
    gate: GateDecision | None = None
    truth: dict[str, str] | None = None
    previous_manifest: Path | None = None
    dvc_remote: str = ""
    s3_endpoint_url: str = ""
    labels: dict[str, str] | None = None
    trigger: TriggerEvidence | None = None
    release: Release | None = None
    approval: ApprovalStatus | None = None
    requires_approval: bool = False
    image: str = ""
    gate_samples: int = 2000
    gate_margin: float = 0.01
    subgroup_min_n: int = 30
    subgroup_margin: float = 0.05


def _previous_manifest(inputs: ChangeInputs, champion: ModelBundleMeta):
    """(manifest frame or None, its md5, why there is none)."""
    import pandas as pd

    from xrayops.release.dataset_diff import DatasetDiffError, read_version_manifest

    md5 = champion.lineage.dataset_md5
    if inputs.previous_manifest is not None:
        if not Path(inputs.previous_manifest).is_file():
            return None, md5, f"previous manifest {inputs.previous_manifest} not found"
        return pd.read_parquet(inputs.previous_manifest), md5, ""
    if not md5:
        return None, "", "the champion records no dataset version (lineage.dataset_md5)"
    if not inputs.dvc_remote:
        return None, md5, "no DVC remote given to read the champion's dataset version from"
    try:
        return read_version_manifest(inputs.dvc_remote, md5, inputs.s3_endpoint_url), md5, ""
    except DatasetDiffError as exc:
        return None, md5, str(exc)


def build_change_record(inputs: ChangeInputs, out_dir: Path) -> tuple[ChangeRecord, Path, Path]:
    """Evaluate both models on the test split (intervals, subgroups, calibration, OOD), gate them
    unless a decision is given, diff the dataset versions, and write the record to `out_dir`."""
    import pandas as pd

    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.evaluate.gate import GateModel, GatePolicy, run_gate
    from xrayops.evaluate.report import evaluate_bundle
    from xrayops.release.dataset_diff import diff_manifests, label_corrections

    out_dir = Path(out_dir)
    metas = {s: read_bundle_meta(Path(b)) for s, b in (("champion", inputs.champion_bundle),
                                                       ("challenger", inputs.challenger_bundle))}
    evaluations = {}
    for side, bundle in (("champion", inputs.champion_bundle), ("challenger", inputs.challenger_bundle)):
        result = evaluate_bundle(Path(bundle), Path(inputs.data_dir), out_dir / "evaluation" / side, "test",
                                 inputs.truth, gradcam_per_group=0)
        evaluations[side] = EvaluationMetrics.model_validate(result.metrics)
    gate = inputs.gate or run_gate(
        GateModel(bundle_dir=str(inputs.champion_bundle), ref=inputs.champion_ref),
        GateModel(bundle_dir=str(inputs.challenger_bundle), ref=inputs.challenger_ref), Path(inputs.data_dir),
        inputs.test_set, GatePolicy(promote=False, samples=inputs.gate_samples, margin=inputs.gate_margin,
                                    subgroup_min_n=inputs.subgroup_min_n, subgroup_margin=inputs.subgroup_margin),
        truth=inputs.truth)
    current = pd.read_parquet(Path(inputs.data_dir) / "manifest.parquet")
    previous, previous_md5, note = _previous_manifest(inputs, metas["champion"])
    dataset = diff_manifests(previous, current, previous_md5, inputs.test_set) if previous is not None else None
    corrections = None
    if inputs.labels is not None:
        ok = current[current["status"] == "ok"]
        corrections = label_corrections(dict(zip(ok["image_id"].astype(str), ok["region"].astype(str))), inputs.labels)
    record = assemble(inputs.champion_ref, metas["champion"], evaluations["champion"], inputs.challenger_ref,
                      metas["challenger"], evaluations["challenger"], gate, dataset, note, corrections, inputs.trigger,
                      inputs.release, inputs.approval, inputs.requires_approval, inputs.image)
    return (record, *write_change_record(record, out_dir))


def candidate_members(release: Release, previous: Release | None, member: str = ""):
    """(the member the release changes, the member it replaces or None): the one given by name, else
    the only member whose registry version differs from the previous release's."""
    before = {m.member: m for m in previous.members} if previous is not None else {}
    changed = [m for m in release.members if before.get(m.member) is None
               or before[m.member].weights_sha256 != m.weights_sha256]
    if member:
        chosen = next((m for m in release.members if m.member == member), None)
        if chosen is None:
            raise ValueError(f"release {release.release_id} has no member {member!r} "
                             f"({', '.join(m.member for m in release.members)})")
    elif len(changed) == 1:
        chosen = changed[0]
    else:
        raise ValueError(f"release {release.release_id} changes {len(changed)} members "
                         f"({', '.join(m.member for m in changed) or 'none'}): name one with --member")
    return chosen, before.get(chosen.member)


def record_release(
    release: Release, previous: Release | None, data_dir: Path, test_set: str, tracking_uri: str | None,
    out_dir: Path, champion_ref: str = "", member: str = "", **inputs,
) -> tuple[ChangeRecord, Path, Path]:
    """The change record of a published candidate release: its changed member against the member
    it replaces in the previous release (or `champion_ref`), both resolved from the registry (or
    bundle folders), with the registry's approval state. `inputs`: further ChangeInputs fields
    (gate, truth, previous_manifest, dvc_remote, labels, trigger, requires_approval, image, ...)."""
    from xrayops.registry import resolve_bundle
    from xrayops.release.approval import ApprovalError, approval_status

    challenger, replaced = candidate_members(release, previous, member)
    champion = champion_ref or (replaced.model_uri if replaced is not None else "")
    if not champion:
        raise ValueError(f"release {release.release_id} replaces no earlier {challenger.member} member: give the "
                         "champion to compare with (--champion)")
    out_dir = Path(out_dir)
    bundles = {side: resolve_bundle(ref, tracking_uri, out_dir / "models" / side)
               for side, ref in (("champion", champion), ("challenger", challenger.model_uri))}
    try:
        approval = approval_status(tracking_uri, release)
    except ApprovalError as exc:  # bundle-folder members: the record says why nobody can approve it yet
        log.warning("no approval state", release=release.release_id, reason=str(exc))
        approval = None
    return build_change_record(ChangeInputs(
        champion_bundle=bundles["champion"], champion_ref=champion, challenger_bundle=bundles["challenger"],
        challenger_ref=challenger.model_uri, data_dir=Path(data_dir), test_set=test_set, release=release,
        approval=approval, **inputs), out_dir)
