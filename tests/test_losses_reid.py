"""ReID losses against hand-computed values (DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch

from passreid.losses.reid import ReIDLoss, hard_example_mining, id_loss, pairwise_euclidean, triplet_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_id_loss_plain_and_smoothed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    # -log softmax of the true class: log(sum exp) - logit.
    lse0, lse1 = math.log(math.exp(2) + 2), math.log(2 + math.e)
    plain = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    assert id_loss(logits, labels).item() == pytest.approx(plain, rel=1e-6)

    eps, c = 0.1, 3
    # Target (1 - eps) one-hot + eps / C: loss = sum_j t_j * (lse - z_j).
    row0 = (1 - eps + eps / c) * (lse0 - 2) + 2 * (eps / c) * (lse0 - 0)
    row1 = (eps / c) * (lse1 - 0) + (eps / c) * (lse1 - 1) + (1 - eps + eps / c) * (lse1 - 0)
    assert id_loss(logits, labels, epsilon=eps).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_pairwise_euclidean_known_points_and_clamped_diagonal():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    d = pairwise_euclidean(x)
    assert d[0, 1].item() == pytest.approx(5.0) and d[1, 0].item() == pytest.approx(5.0)
    assert d[0, 0].item() == pytest.approx(1e-6)  # sqrt(clamp(0, 1e-12))
    y = torch.tensor([[0.0, 1.0]])
    assert pairwise_euclidean(x, y)[:, 0].tolist() == pytest.approx([1.0, math.sqrt(9 + 9)])


def test_batch_hard_triplet_on_a_line():
    # Points 0, 1 (identity 0) and 3, 7 (identity 1). Farthest positive / nearest negative:
    # a=0: 1 / 3, a=1: 1 / 2, a=3: 4 / 2, a=7: 4 / 6.
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    d_ap, d_an = hard_example_mining(pairwise_euclidean(feats), labels)
    assert d_ap.tolist() == pytest.approx([1, 1, 4, 4])
    assert d_an.tolist() == pytest.approx([3, 2, 2, 6])
    soft = (softplus(-2) + softplus(-1) + softplus(2) + softplus(-2)) / 4
    assert triplet_loss(feats, labels).item() == pytest.approx(soft, rel=1e-6)
    # Hinge with margin 0.3: only anchor 3 violates, by 4 - 2 + 0.3.
    assert triplet_loss(feats, labels, margin=0.3).item() == pytest.approx(2.3 / 4, rel=1e-6)


def test_triplet_without_negatives_is_zero_and_gradients_stay_finite():
    feats = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 5.0]], requires_grad=True)  # a duplicate: distance 0
    loss = triplet_loss(feats, torch.tensor([0, 0, 0]))
    assert loss.item() == 0.0
    loss = triplet_loss(feats, torch.tensor([0, 0, 1]))
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_reid_loss_weights_parts_and_float32_under_autocast():
    torch.manual_seed(0)
    logits, feats = torch.randn(8, 5), torch.randn(8, 16) * 10
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    criterion = ReIDLoss(id_weight=0.5, triplet_weight=2.0, label_smoothing=0.1, triplet_margin=None)
    total, parts = criterion(logits, feats, labels)
    assert parts["id"].item() == pytest.approx(id_loss(logits, labels, epsilon=0.1).item())
    assert parts["triplet"].item() == pytest.approx(triplet_loss(feats, labels).item())
    assert total.item() == pytest.approx(0.5 * parts["id"].item() + 2.0 * parts["triplet"].item())
    # Under bf16 autocast the distance matmul would lose most digits; the loss must not.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_amp, _ = criterion(logits, feats, labels)
    assert total_amp.dtype == torch.float32
    assert total_amp.item() == pytest.approx(total.item(), rel=1e-6)


def test_reid_loss_triplet_only_needs_no_logits_and_rejects_bad_settings():
    feats, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    total, parts = ReIDLoss(id_weight=0.0)(None, feats, labels)
    assert set(parts) == {"triplet"} and total.item() == pytest.approx(triplet_loss(feats, labels).item())
    with pytest.raises(ValueError, match="logits"):
        ReIDLoss()(None, feats, labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        ReIDLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="both 0"):
        ReIDLoss(id_weight=0.0, triplet_weight=0.0)
