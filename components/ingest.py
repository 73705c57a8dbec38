from kfp.dsl import Dataset, Input, Output

from components._image import xrayops_component


@xrayops_component
def ingest_op(dicom: Input[Dataset], image_size: int, workers: int, dataset: Output[Dataset]):
    """DICOM folder -> manifest.parquet + pixel shards (PHI stays here)."""
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest

    settings = get_settings()
    source = Path(dicom.path)
    source = source / "dicom" if (source / "dicom").is_dir() else source
    summary = ingest(
        source,
        Path(dataset.path),
        PreprocessingSpec(size=image_size),
        key=settings.deid_key.get_secret_value(),
        workers=workers,
        synonyms_path=settings.body_part_synonyms,
    )
    dataset.metadata.update({"n_ok": summary.n_ok, "n_quarantined": summary.n_quarantined})
