"""Join datasets that ingested disjoint slices of one source (the KFP fan-out) into one dataset.

`xrayops.ingest.ingest(part=(i, n))` writes batch i of n as a complete dataset folder. Merging
them gives the dataset a serial run would give, row for row (same ids, regions, splits, reasons),
except where pixels live: each batch's shards are moved over under new sequential names
(shard-00000.npy, ...) rather than re-packed, so memory stays at one manifest and nothing is
decoded twice. Dataset-wide rules that a batch cannot apply alone are re-applied here
(`xrayops.data.manifest.merge_manifests`): an image already kept by an earlier batch becomes a
quarantined duplicate, and its pixels stay, unreferenced, in its batch's shard.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from xrayops.contracts import ManifestRow, PreprocessingSpec
from xrayops.data.manifest import kept_copy_detail, merge_manifests, read_manifest, write_manifest
from xrayops.data.shards import SHARD_GLOB, shard_name
from xrayops.dicom.labels import default_synonyms
from xrayops.ingest import QUARANTINE_COLUMNS, IngestSummary, _write_csv, row_counts, unmapped_values

DUPLICATE_DETAIL = "an earlier file (in sorted order) holds the same image"


def merge_datasets(
    part_dirs: Sequence[Path], out_dir: Path, synonyms: Mapping[str, str] | None = None, move: bool = False
) -> IngestSummary:
    """Merge batch dataset folders, given in batch order, into `out_dir` (see module docstring).

    Every batch must have been made with the same preprocessing spec. With `move`, shards are
    moved rather than copied (the batch folders are scratch space then).
    """
    if not part_dirs:
        raise ValueError("merge_datasets needs at least one batch dataset")
    part_dirs = [Path(p) for p in part_dirs]
    out_dir = Path(out_dir)
    specs = {PreprocessingSpec.model_validate_json((p / "preprocessing.json").read_text()) for p in part_dirs}
    if len(specs) != 1:
        raise ValueError(f"batches were ingested with {len(specs)} different preprocessing specs")
    shards_dir = out_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    for stale in shards_dir.glob(SHARD_GLOB):
        stale.unlink()

    frames, details = [], {}
    number = 0
    for part in part_dirs:
        frame = read_manifest(part / "manifest.parquet")
        renamed = {}
        for shard in sorted((part / "shards").glob(SHARD_GLOB)):
            renamed[shard.name] = shard_name(number)
            (shutil.move if move else shutil.copyfile)(shard, shards_dir / shard_name(number))
            number += 1
        frame["shard"] = frame["shard"].map(lambda s, r=renamed: r.get(s, ""))
        frames.append(frame)
        table = pd.read_csv(part / "quarantine.csv", keep_default_na=False, dtype=str)
        details.update({(r.source_name, r.image_id): r.detail for r in table.itertuples()})

    merged = merge_manifests(frames)
    merged = merged.astype(object).where(merged.notna(), None)  # parquet nulls came back as NaN
    rows = [ManifestRow.model_validate(r) for r in merged.to_dict("records")]
    manifest_path = write_manifest(rows, out_dir / "manifest.parquet")
    (spec,) = specs
    preprocessing_path = out_dir / "preprocessing.json"
    preprocessing_path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    kept = {r.image_id: r for r in rows if r.status == "ok"}

    def detail(r: ManifestRow) -> str:
        if (r.source_name, r.image_id) in details and not (r.reason.startswith("duplicate_sop") and r.image_id in kept):
            return details[(r.source_name, r.image_id)]
        if r.reason in ("duplicate_sop_instance_uid", "duplicate_file") and r.image_id in kept:
            return kept_copy_detail(kept[r.image_id])  # decided across batches, as a serial run words it
        return details.get((r.source_name, r.image_id), DUPLICATE_DETAIL)

    quarantined = sorted((r.source_name, r.image_id, r.reason, detail(r)) for r in rows if r.status != "ok")
    quarantine_path = _write_csv(pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS), out_dir / "quarantine.csv")
    ok = [r for r in rows if r.status == "ok"]
    synonyms = default_synonyms() if synonyms is None else synonyms
    unmapped_path = _write_csv(unmapped_values(ok, synonyms), out_dir / "unmapped_body_parts.csv")
    return IngestSummary(
        n_files=len({r.source_name for r in rows}),
        **row_counts(rows),
        data_dir=out_dir,
        manifest_path=manifest_path,
        shards_dir=shards_dir,
        preprocessing_path=preprocessing_path,
        quarantine_path=quarantine_path,
        unmapped_path=unmapped_path,
    )
