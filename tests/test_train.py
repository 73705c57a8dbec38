"""Pretraining (SimCLR) and linear-head fine-tuning on a tiny learnable dataset."""
import json

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
from xrayops.train.runtime import available_cores, configure_threads, resolve_device, shard_batch

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


def test_byol_resume_restores_the_momentum_encoder(tiny, tmp_path):
    cfg = PretrainConfig(method="byol", epochs=1, batch_size=48, proj_hidden_dim=64, proj_out_dim=16, tau_base=0.9)
    straight = pretrain(tiny.data_dir, tmp_path / "a", cfg, progress=False)
    pretrain(tiny.data_dir, tmp_path / "b", cfg.model_copy(update={"max_steps": 1}), progress=False)
    resumed = pretrain(tiny.data_dir, tmp_path / "b", cfg, progress=False)
    assert resumed.resumed_from_step == 1 and resumed.steps == straight.steps == 3 and resumed.method == "byol"
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6) and -1 <= straight.losses[0] <= 1
    a = torch.load(straight.checkpoint_path, weights_only=True)["model"]
    b = torch.load(resumed.checkpoint_path, weights_only=True)["model"]
    momentum_keys = [k for k in a if k.startswith("backbone_momentum.")]
    assert momentum_keys
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    # The target network moved away from the online one (momentum < 1), but not by much.
    key = "backbone_momentum.conv1.weight"
    assert not torch.equal(a[key], a["backbone.conv1.weight"])
    assert load_backbone(straight.backbone_path)[2]["ssl_method"] == "byol"


def test_supcon_pretrains_on_the_region_tags(tiny, tmp_path):
    cfg = PretrainConfig(method="supcon", epochs=1, batch_size=56, proj_hidden_dim=64, proj_out_dim=16)
    result = pretrain(tiny.data_dir, tmp_path / "s", cfg, progress=False)
    assert result.steps == 3 and np.isfinite(result.losses[0]) and result.losses[0] > 0
    unlabelled = make_data_dir(tmp_path / "u", n_per_class=0, n_unknown=8)
    with pytest.raises(PretrainError, match="SupCon needs region labels"):
        pretrain(unlabelled.data_dir, tmp_path / "u-out", cfg, progress=False)


def _fresh_ssl_model(cfg):
    from xrayops.models.backbone import build_backbone
    from xrayops.models.ssl import build_ssl_model

    backbone, dim = build_backbone(cfg.arch)
    return build_ssl_model(cfg.method, backbone, dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.temperature,
                           cfg.tau_base)


def test_warm_start_trains_on_from_an_earlier_run(tiny, tmp_path):
    from xrayops.train.pretrain import warm_start

    cfg = PretrainConfig(epochs=3, batch_size=48, proj_hidden_dim=64, proj_out_dim=16)
    first = pretrain(tiny.data_dir, tmp_path / "first", cfg, progress=False)
    more = cfg.model_copy(update={"epochs": 1, "seed": 1})
    warm = pretrain(tiny.data_dir, tmp_path / "warm", more.model_copy(update={"init_from": first.checkpoint_path}),
                    progress=False)
    cold = pretrain(tiny.data_dir, tmp_path / "cold", more, progress=False)
    assert warm.init_from == first.checkpoint_path and cold.init_from is None
    # The warm run starts where the first one ended, so its first epoch beats a cold start's.
    assert warm.losses[0] < cold.losses[0], (warm.losses, cold.losses, first.losses)

    # A checkpoint of the same method and head sizes gives the whole model, projection head included.
    saved = torch.load(first.checkpoint_path, weights_only=True)["model"]
    model = _fresh_ssl_model(more)
    assert warm_start(model, first.checkpoint_path, more) == "model"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    # Another method takes the backbone only; BYOL's target starts as the same backbone.
    byol = more.model_copy(update={"method": "byol"})
    model = _fresh_ssl_model(byol)
    assert warm_start(model, first.checkpoint_path, byol) == "backbone"
    assert torch.equal(model.backbone.conv1.weight, saved["backbone.conv1.weight"])
    assert torch.equal(model.backbone_momentum.conv1.weight, saved["backbone.conv1.weight"])
    # A backbone.pt works too.
    model = _fresh_ssl_model(more)
    assert warm_start(model, first.backbone_path, more) == "backbone"
    a, _, _ = load_backbone(first.backbone_path)
    assert torch.equal(model.backbone.conv1.weight, a.conv1.weight)


def test_warm_start_refuses_what_it_cannot_use(tiny, tmp_path):
    cfg = PretrainConfig(epochs=1, batch_size=48, proj_hidden_dim=64, proj_out_dim=16)
    first = pretrain(tiny.data_dir, tmp_path / "first", cfg, progress=False)
    with pytest.raises(PretrainError, match="holds a resnet18 backbone, this run trains a resnet50"):
        pretrain(tiny.data_dir, tmp_path / "r50", cfg.model_copy(update={"arch": "resnet50",
                                                                      "init_from": first.checkpoint_path}),
                 progress=False)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(PretrainError, match="neither a pretrain checkpoint.pt nor a backbone.pt"):
        pretrain(tiny.data_dir, tmp_path / "j", cfg.model_copy(update={"init_from": junk}), progress=False)
    with pytest.raises(PretrainError, match="does not exist"):
        pretrain(tiny.data_dir, tmp_path / "m", cfg.model_copy(update={"init_from": tmp_path / "nope.pt"}),
                 progress=False)
    # Training into the folder it starts from would overwrite the start.
    with pytest.raises(PretrainError, match="in the output folder"):
        pretrain(tiny.data_dir, tmp_path / "first", cfg.model_copy(update={"init_from": first.checkpoint_path}),
                 progress=False)
    # A checkpoint resumes only under the warm start that began it.
    warm = cfg.model_copy(update={"init_from": first.checkpoint_path, "max_steps": 1})
    pretrain(tiny.data_dir, tmp_path / "w", warm, progress=False)
    with pytest.raises(PretrainError, match="init_from"):
        pretrain(tiny.data_dir, tmp_path / "w", cfg, progress=False)
    resumed = pretrain(tiny.data_dir, tmp_path / "w", warm.model_copy(update={"max_steps": None}), progress=False)
    assert resumed.resumed_from_step == 1 and resumed.init_from == first.checkpoint_path


def test_shards_split_every_global_batch_over_the_ranks():
    batch = list(range(10))
    shards = [shard_batch(batch, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # equal sizes; the tail (9) is trimmed
    assert sorted(sum(shards, [])) == batch[:9]
    with pytest.raises(ValueError, match="cannot be split"):
        shard_batch([1], 0, 2)


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
from torch import distributed as dist
import importlib
P = importlib.import_module("xrayops.train.pretrain")  # the module, not the function of that name
torch.set_num_threads(1)
data_dir, out, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
built = {}
def spy(*args, **kwargs):  # keep this rank's model, to compare the ranks' weights afterwards
    built["parts"] = original(*args, **kwargs)
    return built["parts"]
original, P.build_training = P.build_training, spy
cfg = P.PretrainConfig(method=method, epochs=2, batch_size=16, proj_hidden_dim=32, proj_out_dim=8)
result = P.pretrain(data_dir, out, cfg, progress=False)
# Parameters only: batch-norm running statistics are per rank (DDP broadcasts rank 0's at each forward).
total = sum(float(p.detach().double().sum()) for p in built["parts"][0].parameters())
(out / f"rank{dist.get_rank()}.txt").write_text(f"{result.world_size} {result.steps} {result.losses} {total!r}")
"""


@pytest.mark.parametrize("method", ["simclr", "supcon"])
def test_torchrun_ddp_on_cpu_gloo(tmp_path, method):
    import subprocess
    import sys

    from tests.conftest import free_port

    data = make_data_dir(tmp_path / "data", n_per_class=6, n_unknown=4, size=32)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(script), str(data.data_dir), str(out), method,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "XRAYOPS_PROGRESS": "0"})
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    ranks = [(out / f"rank{r}.txt").read_text().split(" ", 2) for r in range(2)]
    assert [r[0] for r in ranks] == ["2", "2"] and [r[1] for r in ranks] == ["2", "2"]
    # Gradients are all-reduced, so both ranks end with the same weights, and the loss
    # each rank reports is the mean over ranks.
    assert ranks[0][2] == ranks[1][2]
    assert (out / "backbone.pt").is_file() and (out / "checkpoint.pt").is_file()


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


def turned_data_dir(root, seed: int = 0):
    """Tiny data whose images carry an off-centre mark (so orientation is defined), each stored
    turned by a known multiple of 90 degrees (np.rot90: counter-clockwise on screen)."""
    data = make_data_dir(root, n_per_class=20, n_unknown=0, size=32, seed=seed)
    rng = np.random.default_rng(seed)
    angles = {}
    rows = data.manifest
    for shard in sorted((data.data_dir / "shards").glob("*.npy")):
        stack = np.load(shard)
        for i in range(len(stack)):
            stack[i, 2:7, 4:16] = 255  # the mark: top left when upright
            k = int(rng.integers(4))
            stack[i] = np.rot90(stack[i], k)
            name = rows[(rows["shard"] == shard.name) & (rows["shard_index"] == i)]["source_name"].item()
            angles[name] = 90.0 * k
        np.save(shard, stack)
    return data, angles


def test_orientation_head_learns_known_angles_and_inference_reports_them(tmp_path):
    data, angles = turned_data_dir(tmp_path / "data")
    backbone = random_backbone(tmp_path / "backbone.pt")
    cfg = FinetuneConfig(epochs=5, batch_size=64, orientation_epochs=40)
    bundle = load_bundle(finetune(data.data_dir, backbone, tmp_path / "bundle", cfg, angles=angles))
    assert bundle.meta.orientation and bundle.meta.orientation_source == "truth"
    assert bundle.meta.lineage.metrics["val_orientation_mae_deg"] < 20
    test = ImageDataset(data.data_dir, "test")
    responses, _ = predict_arrays(bundle, list(test.images.numpy()))
    true = np.array([angles[n] for n in test.rows["source_name"]])
    estimate = np.array([r.orientation_deg for r in responses])
    error = 180 - np.abs(180 - (estimate - true) % 360)
    assert np.mean(error < 45) > 0.9, error  # the right quadrant almost always
    # The region is rotation-averaged; the orientation turns with the image.
    turned, _ = predict_arrays(bundle, [np.rot90(a).copy() for a in test.images.numpy()])
    assert np.allclose([r.confidence for r in turned], [r.confidence for r in responses], atol=1e-4)
    moved = np.array([r.orientation_deg for r in turned])
    assert np.mean(180 - np.abs(180 - (moved - estimate - 90) % 360) < 45) > 0.9
    # evaluate_bundle scores it against the known angles.
    evaluation = evaluate_bundle(bundle_dir := tmp_path / "bundle", data.data_dir, tmp_path / "eval",
                                 truth=data.truth, truth_angles=angles, gradcam_per_group=0)
    assert evaluation.metrics["orientation_mae_deg"] == pytest.approx(float(error.mean()), abs=1e-3)
    assert 0 <= evaluation.metrics["orientation_within_4deg"] <= 1 and not evaluation.gradcam_pngs
    assert bundle_dir.exists()


def test_bundles_without_orientation_still_load_and_report_none(tiny, tmp_path):
    bundle_dir = finetune(tiny.data_dir, random_backbone(tmp_path / "b.pt"), tmp_path / "bundle", FinetuneConfig(epochs=2))
    meta_path = bundle_dir / "bundle.json"
    old = json.loads(meta_path.read_text())
    for key in ("orientation", "orientation_source"):  # a bundle written before the orientation head
        old.pop(key)
    meta_path.write_text(json.dumps(old))
    bundle = load_bundle(bundle_dir)
    assert not bundle.meta.orientation and bundle.model.orientation_head is None
    responses, _ = predict_arrays(bundle, [tiny_image(tiny)])
    assert responses[0].orientation_deg is None


def tiny_image(tiny):
    return ImageDataset(tiny.data_dir, "test").images[0].numpy()
