"""Pretraining (SimCLR) and linear-head fine-tuning on a tiny learnable dataset."""
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_dataset import make_data_dir, random_backbone

from xrayops.bundle import load_bundle
from xrayops.contracts import Lineage
from xrayops.data.dataset import DatasetError, ImageDataset, read_preprocessing
from xrayops.evaluate.report import evaluate_bundle
from xrayops.inference import predict_arrays
from xrayops.models.backbone import load_backbone
from xrayops.regions import REGIONS
from xrayops.train import FinetuneConfig, PretrainConfig, PretrainError, finetune, pretrain
from xrayops.train.pretrain import epoch_batches
from xrayops.train.runtime import available_cores, configure_threads, resolve_device

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), n_per_class=40, n_unknown=8, mislabel_rate=0.1)


def test_pretrain_finetune_evaluate_beats_chance(tiny, tmp_path):
    result = pretrain(tiny.data_dir, tmp_path / "ssl", PretrainConfig(epochs=2, batch_size=32), progress=False)
    assert result.images == 168  # every ok image, the 8 unlabelled ones included
    assert result.steps == 2 * (168 // 32) and len(result.losses) == 2
    assert all(np.isfinite(result.losses))
    bundle_dir = finetune(tiny.data_dir, result.backbone_path, tmp_path / "bundle", FinetuneConfig(epochs=30, batch_size=64))
    evaluation = evaluate_bundle(bundle_dir, tiny.data_dir, tmp_path / "eval", truth=tiny.truth)
    truth = evaluation.metrics["vs_truth"]
    assert truth["chance_majority"] <= 0.35
    assert truth["accuracy"] >= 0.6, truth  # 4 shapes; guessing gets 0.25


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    cfg = PretrainConfig(epochs=2, batch_size=48, proj_hidden_dim=64, proj_out_dim=16)  # 3 steps per epoch
    straight = pretrain(tiny.data_dir, tmp_path / "a", cfg, progress=False)
    half = pretrain(tiny.data_dir, tmp_path / "b", cfg.model_copy(update={"max_steps": 2}), progress=False)
    assert half.steps == 2 and half.losses == []  # stopped mid-epoch, checkpointed
    resumed = pretrain(tiny.data_dir, tmp_path / "b", cfg, progress=False)
    assert resumed.resumed_from_step == 2 and resumed.steps == straight.steps == 6
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    a, _, _ = load_backbone(straight.backbone_path)
    b, _, _ = load_backbone(resumed.backbone_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name
    with pytest.raises(PretrainError, match="lr: 0.0003 -> 0.001"):
        pretrain(tiny.data_dir, tmp_path / "b", cfg.model_copy(update={"lr": 1e-3}), progress=False)
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(PretrainError, match="cannot read .*checkpoint.pt"):
        pretrain(tiny.data_dir, tmp_path / "b", cfg, progress=False)


def test_threads_never_oversubscribe_and_devices_resolve():
    before = torch.get_num_threads()
    threads = configure_threads(num_workers=available_cores())  # workers take every core
    assert threads == torch.get_num_threads() == 1
    torch.set_num_threads(before)
    assert configure_threads(0) <= min(before, available_cores())
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_epoch_batches_are_seeded_and_full():
    first = epoch_batches(10, 4, seed=1, epoch=0)
    assert first == epoch_batches(10, 4, seed=1, epoch=0) != epoch_batches(10, 4, seed=1, epoch=1)
    assert [len(b) for b in first] == [4, 4] and len(set(sum(first, []))) == 8
    assert epoch_batches(3, 8, seed=0, epoch=0)[0] != [] and len(epoch_batches(3, 8, 0, 0)) == 1


def test_finetune_bundle_is_calibrated_and_documented(tiny, tmp_path):
    backbone = random_backbone(tmp_path / "backbone.pt")
    lineage = Lineage(dataset_md5="d41d8c", git_commit="abc123")
    bundle_dir = finetune(tiny.data_dir, backbone, tmp_path / "bundle", FinetuneConfig(epochs=15, batch_size=64), lineage)
    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    assert meta.classes == list(REGIONS)
    assert meta.preprocessing == read_preprocessing(tiny.data_dir)
    assert meta.lineage.dataset_md5 == "d41d8c" and 0.25 < meta.lineage.metrics["val_accuracy"] <= 1
    assert meta.temperature > 0 and meta.ood_threshold is not None
    # The backbone stayed frozen: the bundle's backbone is the file we passed in.
    original, _, _ = load_backbone(backbone)
    for name, weight in original.state_dict().items():
        assert torch.equal(bundle.model.backbone.state_dict()[name], weight), name
    # 95th percentile of the validation energies: about 5 % of val images are flagged out of domain.
    val = ImageDataset(tiny.data_dir, "val", labelled_only=True)
    responses, _ = predict_arrays(bundle, list(val.images.numpy()))
    flagged = np.mean([r.ood for r in responses])
    assert flagged <= 0.05 + 1 / len(val)
    # The embedding averages the four right-angle turns, so turning an image changes nothing.
    assert meta.rotation_average
    turned, _ = predict_arrays(bundle, [np.rot90(a).copy() for a in val.images.numpy()])
    for a, b in zip(responses, turned):
        assert np.allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-4)


def test_augmented_finetune_trains_too(tiny, tmp_path):
    backbone = random_backbone(tmp_path / "backbone.pt")
    cfg = FinetuneConfig(epochs=3, batch_size=64, augment=True)
    meta = load_bundle(finetune(tiny.data_dir, backbone, tmp_path / "bundle", cfg)).meta
    assert meta.lineage.metrics["val_accuracy"] > 0.25


def test_finetune_needs_a_validation_split(tiny, tmp_path):
    no_val = make_data_dir(tmp_path / "data", n_per_class=5, n_unknown=0)
    manifest = pd.read_parquet(no_val.data_dir / "manifest.parquet")
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.to_parquet(no_val.data_dir / "manifest.parquet")
    with pytest.raises(DatasetError, match="needs validation images"):
        finetune(no_val.data_dir, random_backbone(tmp_path / "b.pt"), tmp_path / "bundle", FinetuneConfig(epochs=1))
