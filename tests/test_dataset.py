"""ImageDataset over the ingested layout: ok rows only, labels, splits, shard lookup, errors."""
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_dataset import make_data_dir

from xrayops.data.dataset import DatasetError, ImageDataset, load_images, read_ok_rows, read_preprocessing
from xrayops.regions import region_index


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), n_per_class=10, n_unknown=4, n_quarantined=3, shard_size=7)


def test_rows_ok_only_with_labels(tiny):
    rows = read_ok_rows(tiny.data_dir)
    assert len(rows) == 44 and (rows["status"] == "ok").all()
    assert (rows["label"] == rows["region"].map(region_index)).all()
    assert set(rows.loc[rows["region"] == "unknown", "label"]) == {-1}
    labelled = read_ok_rows(tiny.data_dir, ["val", "test"], labelled_only=True)
    assert set(labelled["split"]) == {"val", "test"} and (labelled["label"] >= 0).all()


def test_label_overrides_replace_tags_and_can_exclude(tiny):
    base = read_ok_rows(tiny.data_dir, "train", labelled_only=True)
    first, second = base["image_id"].iloc[0], base["image_id"].iloc[1]
    other = next(r for r in ("skull", "knee") if r != base["region"].iloc[0])
    labels = {first: other, second: "unknown", "no-such-image": "hand"}
    rows = read_ok_rows(tiny.data_dir, "train", labelled_only=True, labels=labels)
    assert len(rows) == len(base) - 1 and second not in set(rows["image_id"])  # "unknown": out of labelled training
    row = rows.set_index("image_id").loc[first]
    assert row["region"] == other and row["label"] == region_index(other)
    assert row["manifest_region"] == base["region"].iloc[0]  # the tag is kept beside the override
    untouched = rows[~rows["image_id"].isin([first])]
    assert (untouched["region"] == untouched["manifest_region"]).all()
    dataset = ImageDataset(tiny.data_dir, "train", labelled_only=True, labels=labels)
    assert int(dataset.labels[dataset.rows["image_id"].tolist().index(first)]) == region_index(other)


def test_images_come_from_their_shard_rows(tiny):
    rows = read_ok_rows(tiny.data_dir).sample(frac=1, random_state=0)  # rows out of shard order
    images = load_images(tiny.data_dir, rows)
    for i in (0, 5, 17, 43):
        row = rows.iloc[i]
        shard = np.load(tiny.data_dir / "shards" / row["shard"])
        assert np.array_equal(images[i], shard[row["shard_index"]])


def test_dataset_items_are_unit_float_images(tiny):
    dataset = ImageDataset(tiny.data_dir, "train", labelled_only=True)
    image, label = dataset[3]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert torch.allclose(image[0] * 255, dataset.images[3].float())
    assert label == region_index(dataset.rows.loc[3, "region"])
    flipped = ImageDataset(tiny.data_dir, "train", transform=lambda x: 1 - x)
    assert torch.allclose(flipped[0][0], 1 - ImageDataset(tiny.data_dir, "train")[0][0])
    assert read_preprocessing(tiny.data_dir).size == 32


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(DatasetError, match="manifest.parquet not found"):
        ImageDataset(tmp_path)
    with pytest.raises(DatasetError, match="no labelled ok images in split 'nope'"):
        ImageDataset(tiny.data_dir, "nope", labelled_only=True)
    broken = make_data_dir(tmp_path / "broken", n_per_class=2, n_unknown=0)
    (broken.data_dir / "shards" / "shard-00000.npy").unlink()
    with pytest.raises(DatasetError, match="shard-00000.npy listed in the manifest does not exist"):
        ImageDataset(broken.data_dir)
    manifest = pd.read_parquet(broken.data_dir / "manifest.parquet")
    manifest.loc[0, ["shard", "shard_index"]] = ["shard-00000.npy", 99]
    np.save(broken.data_dir / "shards" / "shard-00000.npy", np.zeros((3, 32, 32), np.uint8))
    manifest.to_parquet(broken.data_dir / "manifest.parquet")
    with pytest.raises(DatasetError, match="has shape"):
        ImageDataset(broken.data_dir)
