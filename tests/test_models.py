"""Backbones, heads, SimCLR objective, temperature scaling and the out-of-domain score."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xrayops.evaluate.metrics import expected_calibration_error
from xrayops.models import (
    BYOLModel,
    RegionClassifier,
    SimCLRModel,
    SupConLoss,
    SupConModel,
    angle_to_vector,
    angular_error,
    build_backbone,
    build_ssl_model,
    energy_score,
    fit_temperature,
    fold_standardization,
    load_backbone,
    orientation_loss,
    save_backbone,
    vector_to_angle,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_embeds_grey_images(arch, dim):
    backbone, embedding_dim = build_backbone(arch)
    assert embedding_dim == dim
    assert backbone.conv1.in_channels == 1
    assert backbone.eval()(torch.rand(2, 1, 32, 32)).shape == (2, dim)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown backbone arch 'vit'"):
        build_backbone("vit")
    backbone, dim = build_backbone()
    with pytest.raises(ValueError, match="unknown SSL method 'moco'"):
        build_ssl_model("moco", backbone, dim)


def test_classifier_logits_are_head_of_embedding():
    torch.manual_seed(0)
    model = RegionClassifier(*build_backbone(), n_classes=14).eval()
    x = torch.rand(3, 1, 32, 32)
    logits, embedding = model.forward_with_embedding(x)
    assert logits.shape == (3, 14) and embedding.shape == (3, 512)
    assert torch.allclose(model(x), logits) and torch.allclose(model.embed(x), embedding)
    assert torch.allclose(model.head(embedding), logits)


def test_rotation_averaged_embedding_ignores_right_angle_turns():
    torch.manual_seed(0)
    backbone, dim = build_backbone()
    plain = RegionClassifier(backbone, dim, 14).eval()
    averaged = RegionClassifier(backbone, dim, 14, rotation_average=True).eval()
    averaged.head = plain.head
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = torch.stack([backbone(torch.rot90(x, k, (-2, -1))) for k in range(4)]).mean(0)
        assert torch.allclose(averaged.embed(x), expected, atol=1e-5)
        assert torch.allclose(averaged.embed(torch.rot90(x, 1, (-2, -1))), averaged.embed(x), atol=1e-5)
        assert not torch.allclose(plain.embed(torch.rot90(x, 1, (-2, -1))), plain.embed(x), atol=1e-3)
        logits, embedding = averaged.forward_with_embedding(x)
        assert torch.allclose(logits, plain.head(embedding)) and torch.allclose(averaged(x), logits)


def test_backbone_file_round_trip(tmp_path):
    backbone, _ = build_backbone()
    path = save_backbone(tmp_path / "backbone.pt", backbone, "resnet18", "simclr")
    loaded, dim, info = load_backbone(path)
    x = torch.rand(2, 1, 32, 32)
    assert dim == 512 and info == {"arch": "resnet18", "ssl_method": "simclr", "in_chans": 1}
    assert torch.equal(backbone.eval()(x), loaded.eval()(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a backbone.pt"):
        load_backbone(tmp_path / "junk.pt")


def nt_xent_by_hand(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> float:
    """NT-Xent written out: each of the 2N views must pick its partner among the 2N-1 others."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1).double()
    n = len(z_a)
    sim = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        total += -(sim[i, partner] - torch.logsumexp(others, 0))
    return float(total / (2 * n))


def test_nt_xent_value_matches_the_formula():
    torch.manual_seed(0)
    model = SimCLRModel(*build_backbone(), temperature=0.5)
    z_a, z_b = torch.randn(6, 128), torch.randn(6, 128)
    assert model.criterion(z_a, z_b).item() == pytest.approx(nt_xent_by_hand(z_a, z_b, 0.5), rel=1e-5)


def test_nt_xent_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = SimCLRModel(*build_backbone(), hidden_dim=128, out_dim=32)
    view_a, view_b = torch.rand(16, 1, 32, 32), torch.rand(16, 1, 32, 32)
    view_b = 0.8 * view_a + 0.2 * view_b  # related pairs
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(view_a, view_b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def miscalibrated_example(scale: float = 4.0, n: int = 3000):
    """Labels drawn from softmax(true_logits); the model reports scale * true_logits (overconfident)."""
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(n, 5, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    return scale * true_logits, labels


def test_temperature_scaling_recovers_the_overconfidence():
    logits, labels = miscalibrated_example(scale=4.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    nll_before = F.cross_entropy(logits, labels).item()
    nll_after = F.cross_entropy(logits / temperature, labels).item()
    ece_before = expected_calibration_error(labels.numpy(), torch.softmax(logits, 1).numpy())
    ece_after = expected_calibration_error(labels.numpy(), torch.softmax(logits / temperature, 1).numpy())
    assert nll_after < nll_before - 0.3
    assert ece_after < 0.03 < ece_before
    with pytest.raises(ValueError):
        fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def test_folded_standardisation_is_one_equivalent_linear_layer():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    x = torch.randn(5, 8) * 4 + 2
    mean, std = x.mean(0), x.std(0)
    folded = fold_standardization(head, mean, std)
    assert isinstance(folded, torch.nn.Linear) and folded.weight.shape == (3, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), head((x - mean) / std), atol=1e-5)


def test_energy_score_is_higher_for_flat_logits():
    peaked = torch.tensor([[10.0, 0.0, 0.0]])
    flat = torch.tensor([[0.1, 0.0, 0.05]])
    assert energy_score(flat) > energy_score(peaked)
    assert energy_score(peaked).item() == pytest.approx(-np.log(np.exp(10) + 2), rel=1e-6)
    assert energy_score(peaked, 2.0).item() == pytest.approx(-2 * np.log(np.exp(5) + 2), rel=1e-6)


def supcon_by_hand(z_a: torch.Tensor, z_b: torch.Tensor, labels: list[int], tau: float) -> float:
    """Khosla et al. 2020, eq. 2 (L^sup_out) written out with loops; -1 = a class of its own."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1).double()
    n = len(z_a)
    classes = [c if c >= 0 else -100 - i for i, c in enumerate(labels)] * 2
    total = 0.0
    for i in range(2 * n):
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(2 * n) if a != i)
        positives = [p for p in range(2 * n) if p != i and classes[p] == classes[i]]
        total += -sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives) / len(positives)
    return float(total / (2 * n))


def test_supcon_loss_matches_the_formula():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 16), torch.randn(6, 16)
    labels = [0, 1, 0, 2, -1, 1]
    loss = SupConLoss(temperature=0.5)(z_a, z_b, torch.tensor(labels))
    assert loss.item() == pytest.approx(supcon_by_hand(z_a, z_b, labels, 0.5), rel=1e-5)
    # All images unlabelled: every image is its own class, and SupCon is exactly NT-Xent.
    alone = SupConLoss(0.5)(z_a, z_b, torch.full((6,), -1))
    assert alone.item() == pytest.approx(nt_xent_by_hand(z_a, z_b, 0.5), rel=1e-5)
    with pytest.raises(ValueError, match="labels must have shape"):
        SupConLoss()(z_a, z_b, torch.zeros(5, dtype=torch.long))


def test_supcon_pulls_a_class_together():
    torch.manual_seed(0)
    model = SupConModel(*build_backbone(), hidden_dim=64, out_dim=16)
    x = torch.rand(8, 1, 32, 32)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    x[labels == 1] += 0.5 * torch.rand(1, 1, 32, 32)  # a shared class pattern
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model.loss(x, x.flip(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    with pytest.raises(ValueError, match="SupCon needs labels"):
        model.loss(x, x)


def test_byol_trains_the_online_network_and_moves_the_target_by_momentum():
    torch.manual_seed(0)
    model = build_ssl_model("byol", *build_backbone(), hidden_dim=64, out_dim=16, tau_base=0.99)
    assert isinstance(model, BYOLModel)
    assert all(not p.requires_grad for p in model.backbone_momentum.parameters())
    # The target's momentum rises from tau_base to 1 on a cosine (paper 000: tau_base = 0.9995).
    assert model.momentum(0, 100) == pytest.approx(0.99) and model.momentum(100, 100) == pytest.approx(1.0, abs=1e-5)
    assert model.momentum(50, 100) == pytest.approx(0.995, abs=1e-4)
    x = torch.rand(4, 1, 32, 32)
    loss = model.loss(x, x.flip(-1))
    assert -1.0 <= loss.item() <= 1.0  # negative cosine similarity
    loss.backward()
    assert model.backbone_momentum.conv1.weight.grad is None and model.backbone.conv1.weight.grad is not None
    online = model.backbone.conv1.weight.detach().clone()
    target = model.backbone_momentum.conv1.weight.detach().clone()
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    model.after_step(0, 100)  # m = 0.99: target <- 0.99 target + 0.01 online
    expected = 0.99 * target + 0.01 * (online + 1.0)
    assert torch.allclose(model.backbone_momentum.conv1.weight, expected, atol=1e-6)


def test_orientation_vectors_and_loss():
    angles = torch.tensor([0.0, 90.0, 359.0, 181.0])
    vectors = angle_to_vector(angles)
    assert torch.allclose(vectors[1], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(vector_to_angle(3 * vectors), angles, atol=1e-3)  # the norm does not matter
    # paper 004: the loss wraps around, so 2 deg vs 359 deg is a small error.
    near = orientation_loss(angle_to_vector(torch.tensor([2.0])), torch.tensor([359.0]))
    far = orientation_loss(angle_to_vector(torch.tensor([180.0])), torch.tensor([359.0]))
    assert near.item() == pytest.approx(2 - 2 * np.cos(np.deg2rad(3)), rel=1e-4) and far.item() > 3.9
    assert angular_error(np.array([2.0, 90.0]), np.array([359.0, 270.0])).tolist() == pytest.approx([3.0, 180.0])


def test_orientation_head_reads_the_upright_features():
    torch.manual_seed(0)
    backbone, dim = build_backbone()
    model = RegionClassifier(backbone, dim, 14, rotation_average=True, orientation=True).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        logits, embedding, orientation = model.forward_all(x)
        assert torch.allclose(logits, model(x), atol=1e-5) and torch.allclose(embedding, model.embed(x), atol=1e-5)
        assert torch.allclose(orientation, model.orientation_head(backbone(x)), atol=1e-5)
        # Turning the image leaves the region alone but changes the orientation output.
        _, _, turned = model.forward_all(torch.rot90(x, 1, (-2, -1)))
    assert not torch.allclose(turned, orientation, atol=1e-3)
    assert RegionClassifier(backbone, dim, 14).forward_all(x)[2] is None
