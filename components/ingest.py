from typing import List

from kfp.dsl import Dataset, Input, Output

from components._image import xrayops_component


@xrayops_component
def ingest_op(dicom: Input[Dataset], image_size: int, workers: int, dataset: Output[Dataset]):
    """DICOM folder -> manifest.parquet + pixel shards (PHI stays here)."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.contracts import PreprocessingSpec
    from xrayops.dicom.deid import require_key
    from xrayops.ingest import ingest

    settings = get_settings()
    source = Path(dicom.path)
    source = source / "dicom" if (source / "dicom").is_dir() else source
    summary = ingest(
        source,
        Path(dataset.path),
        PreprocessingSpec(size=image_size, admission=settings.admission_policy()),
        key=require_key(settings),
        workers=workers,
        synonyms_path=settings.body_part_synonyms,
    )
    dataset.metadata.update({"n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined})


# The ingestion fan-out (pipelines/ingestion.py): plan the batches, ingest each, merge them.


@xrayops_component
def plan_ingest_op(source_dir: str, files_per_batch: int) -> List[dict]:
    """Split the DICOM files under `source_dir` into batches of <= files_per_batch: one
    {"part_index", "n_parts"} item per batch (a single list output, which ParallelFor iterates)."""
    from xrayops.ingest import plan_parts

    _, n_parts = plan_parts(source_dir, files_per_batch)
    return [{"part_index": i, "n_parts": n_parts} for i in range(n_parts)]


@xrayops_component
def ingest_part_op(
    source_dir: str, part_index: int, n_parts: int, image_size: int, workers: int, dataset: Output[Dataset]
):
    """Ingest batch `part_index` of `n_parts` (contiguous slices of the sorted file list)."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.contracts import PreprocessingSpec
    from xrayops.dicom.deid import require_key
    from xrayops.ingest import ingest

    settings = get_settings()
    summary = ingest(
        Path(source_dir),
        Path(dataset.path),
        PreprocessingSpec(size=image_size, admission=settings.admission_policy()),
        key=require_key(settings),
        workers=workers,
        synonyms_path=settings.body_part_synonyms,
        part=(part_index, n_parts),
    )
    dataset.metadata.update({"part": part_index, "n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined})


@xrayops_component
def merge_ingest_op(parts: Input[List[Dataset]], dataset: Output[Dataset]):
    """Merge the batch datasets into one: manifests joined, cross-batch duplicates quarantined."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.data.merge import merge_datasets
    from xrayops.dicom.labels import load_synonyms

    settings = get_settings()
    ordered = [p for _, p in sorted(enumerate(parts), key=lambda ip: int(ip[1].metadata.get("part", ip[0])))]
    synonyms = load_synonyms(settings.body_part_synonyms) if settings.body_part_synonyms else None
    summary = merge_datasets([Path(p.path) for p in ordered], Path(dataset.path), synonyms)
    dataset.metadata.update({"n_parts": len(ordered), "n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined})
