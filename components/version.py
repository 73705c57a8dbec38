from typing import NamedTuple

from kfp.dsl import Dataset, Input, Output

from components._image import xrayops_component


@xrayops_component
def version_dataset_op(
    dataset: Input[Dataset], remote_url: str, s3_endpoint_url: str, dvc_file: Output[Dataset]
) -> NamedTuple("DatasetVersionOut", [("md5", str)]):
    """`dvc add` + `dvc push` the ingested dataset; outputs its content hash and the .dvc file."""
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from xrayops.config import get_settings
    from xrayops.versioning import version_dataset

    settings = get_settings()
    remote_url = remote_url or settings.dvc_remote()
    s3_endpoint_url = s3_endpoint_url or settings.s3_endpoint_url
    repo = Path(tempfile.mkdtemp(prefix="xrayops-dvc-"))
    shutil.copytree(dataset.path, repo / "data")
    version = version_dataset(repo, Path("data"), remote_url=remote_url, endpoint_url=s3_endpoint_url)
    shutil.copyfile(repo / "data.dvc", dvc_file.path)
    dvc_file.metadata.update({"md5": version.md5, "remote": version.remote})
    return namedtuple("DatasetVersionOut", ["md5"])(version.md5)
