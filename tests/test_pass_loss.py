"""PASS loss against a hand-written reference of DESIGN §3 (pairings, skipped views, centering, temperatures)."""

from __future__ import annotations

import math

import pytest
import torch

from passreid.losses.pass_loss import PASSLoss, ViewLogits, pair_mask

G, L, B, K = 2, 9, 3, 7  # global views, local views, batch, prototypes


def _random_outputs(seed: int, part_aware: bool = True) -> tuple[ViewLogits, ViewLogits]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 2

    if not part_aware:
        return ViewLogits(rand(G + L, B, K), ()), ViewLogits(rand(G, B, K), ())
    student = ViewLogits(rand(G + L, B, K), tuple(rand(G + L // 3, B, K) for _ in range(3)))
    teacher = ViewLogits(rand(G, B, K), tuple(rand(G, B, K) for _ in range(3)))
    return student, teacher


def _ce(teacher_row: torch.Tensor, student_row: torch.Tensor, center: torch.Tensor, t_temp: float,
        s_temp: float) -> float:
    """-sum_k softmax((t - c) / tt)_k * log softmax(s / ts)_k for one image, written out."""
    t = [(float(teacher_row[k]) - float(center[k])) / t_temp for k in range(K)]
    s = [float(student_row[k]) / s_temp for k in range(K)]
    t_max, s_max = max(t), max(s)
    t_norm = sum(math.exp(v - t_max) for v in t)
    s_lse = s_max + math.log(sum(math.exp(v - s_max) for v in s))
    return -sum(math.exp(t[k] - t_max) / t_norm * (s[k] - s_lse) for k in range(K))


def reference_loss(student: ViewLogits, teacher: ViewLogits, center: torch.Tensor, t_temp: float,
                   s_temp: float = 0.1) -> tuple[float, dict[str, float]]:
    """DESIGN §3 read literally.

    Student views are [global 1, global 2, top x3, middle x3, bottom x3]; the
    part-k tensors hold [global 1, global 2, band-k crop x3].
    """
    pairs: dict[str, list[float]] = {"cls": []}
    # cls term: every teacher global cls against every student cls output of all 11 views, same view skipped.
    for g in range(G):
        for v in range(G + L):
            if v == g:
                continue
            pairs["cls"].append(sum(_ce(teacher.cls[g, b], student.cls[v, b], center[0], t_temp, s_temp)
                                    for b in range(B)) / B)
    # part-k term: teacher global part-k vs the student's part-k of the OTHER global view and the 3 band-k crops.
    for k, (t_part, s_part) in enumerate(zip(teacher.parts, student.parts), start=1):
        pairs[f"part{k}"] = []
        for g in range(G):
            other = 1 - g
            views = [other] + [G + j for j in range(3)]
            for v in views:
                pairs[f"part{k}"].append(sum(_ce(t_part[g, b], s_part[v, b], center[k], t_temp, s_temp)
                                             for b in range(B)) / B)
    every = [x for values in pairs.values() for x in values]
    return sum(every) / len(every), {name: sum(v) / len(v) for name, v in pairs.items()}


@pytest.mark.parametrize("iteration", [0, 5, 20])
def test_loss_equals_reference_with_centers_and_temperature_warmup(iteration: int) -> None:
    student, teacher = _random_outputs(0)
    loss_fn = PASSLoss(K, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_iters=10)
    loss_fn.center.copy_(torch.randn(4, K, generator=torch.Generator().manual_seed(1)))
    out = loss_fn(student, teacher, iteration=iteration)
    temp = 0.04 + 0.03 * min(iteration, 10) / 10
    expected, terms = reference_loss(student, teacher, loss_fn.center.double(), temp)
    assert loss_fn.teacher_temperature(iteration) == pytest.approx(temp)
    assert float(out.loss) == pytest.approx(expected, abs=1e-9)
    for name, value in terms.items():
        assert float(out.stats[f"loss_{name}"]) == pytest.approx(value, abs=1e-9)


def test_loss_float32_inputs_match_reference_to_1e6() -> None:
    student, teacher = _random_outputs(3)
    loss_fn = PASSLoss(K)
    out = loss_fn(ViewLogits(student.cls.float(), tuple(p.float() for p in student.parts)),
                  ViewLogits(teacher.cls.float(), tuple(p.float() for p in teacher.parts)), iteration=0)
    expected, _ = reference_loss(student, teacher, torch.zeros(4, K, dtype=torch.float64), 0.04)
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - expected) < 1e-6 * max(1.0, abs(expected))


def test_total_is_mean_over_all_44_pairs() -> None:
    student, teacher = _random_outputs(4)
    out = PASSLoss(K)(student, teacher, iteration=0)
    s = {k: float(v) for k, v in out.stats.items()}
    # 2 x 10 cls pairs and 2 x 4 pairs per part: the total weighs each pair equally.
    expected = (20 * s["loss_cls"] + 8 * (s["loss_part1"] + s["loss_part2"] + s["loss_part3"])) / 44
    assert float(out.loss) == pytest.approx(expected, rel=1e-12)


def test_same_view_pairs_are_skipped() -> None:
    mask = pair_mask(2, 11)
    assert mask.sum() == 20 and not mask[0, 0] and not mask[1, 1] and mask[0, 1] and mask[1, 0]
    # Changing the student's global view 1 moves exactly one cls pair: (teacher view 2, student view 1).
    student, teacher = _random_outputs(5)
    loss_fn = PASSLoss(K)
    changed = student.cls.clone()
    changed[0] += torch.randn(B, K, dtype=torch.float64)
    base = loss_fn(student, teacher, 0).stats["loss_cls"]
    new = loss_fn(ViewLogits(changed, student.parts), teacher, 0).stats["loss_cls"]
    zero = torch.zeros(K)
    delta_pair = sum(_ce(teacher.cls[1, b], changed[0, b], zero, 0.04, 0.1)
                     - _ce(teacher.cls[1, b], student.cls[0, b], zero, 0.04, 0.1) for b in range(B)) / B
    assert float(new - base) == pytest.approx(delta_pair / 20, abs=1e-9)


def test_plain_dino_loss_is_the_cls_term_only() -> None:
    student, teacher = _random_outputs(6, part_aware=False)
    loss_fn = PASSLoss(K, num_tokens=1)
    out = loss_fn(student, teacher, iteration=0)
    expected, _ = reference_loss(student, teacher, torch.zeros(1, K, dtype=torch.float64), 0.04)
    assert float(out.loss) == pytest.approx(expected, abs=1e-9)
    assert set(out.stats) == {"loss_cls", "teacher_entropy", "teacher_usage_entropy"}


def test_usage_entropy_is_the_entropy_of_the_batch_mean_distribution() -> None:
    # Teacher logits that put every image on one prototype (after centering at 0): usage entropy 0;
    # two halves of the batch on two prototypes: usage entropy of the halves' shares, per-image entropy ~0 in both cases.
    loss_fn = PASSLoss(K, num_tokens=1)
    student = ViewLogits(torch.zeros(4, B, K, dtype=torch.float64), ())
    one = torch.zeros(2, B, K, dtype=torch.float64)
    one[..., 3] = 10.0
    out = loss_fn(student, ViewLogits(one, ()), iteration=0)
    assert float(out.stats["teacher_usage_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out.stats["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    two = torch.zeros(2, B, K, dtype=torch.float64)
    two[:, : B // 2, 3] = 10.0
    two[:, B // 2:, 5] = 10.0
    out = loss_fn(student, ViewLogits(two, ()), iteration=0)
    share = (B // 2) / B
    expected = -(share * math.log(share) + (1 - share) * math.log(1 - share))  # log 2 for an even batch
    assert float(out.stats["teacher_usage_entropy"]) == pytest.approx(expected, abs=1e-6)
    assert float(out.stats["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)


def test_teacher_entropy_is_log_k_for_a_uniform_teacher() -> None:
    student, _ = _random_outputs(7)
    zeros = torch.zeros(G, B, K, dtype=torch.float64)
    teacher = ViewLogits(zeros, (zeros, zeros, zeros))
    out = PASSLoss(K)(student, teacher, 0)
    assert float(out.stats["teacher_entropy"]) == pytest.approx(math.log(K), rel=1e-6)


def test_loss_gradient_reaches_only_the_student() -> None:
    student, teacher = _random_outputs(8)
    s_cls = student.cls.clone().requires_grad_(True)
    t_cls = teacher.cls.clone().requires_grad_(True)
    out = PASSLoss(K)(ViewLogits(s_cls, student.parts), ViewLogits(t_cls, teacher.parts), 0)
    out.loss.backward()
    assert s_cls.grad is not None and s_cls.grad.abs().sum() > 0
    assert t_cls.grad is None


def test_center_update_formula() -> None:
    _, teacher = _random_outputs(9)
    loss_fn = PASSLoss(K, center_momentum=0.9)
    start = torch.randn(4, K, generator=torch.Generator().manual_seed(2))
    loss_fn.center.copy_(start)
    loss_fn.update_center(teacher)
    for t, logits in enumerate(teacher.tokens()):
        batch_mean = logits.mean(dim=(0, 1)).float()  # over both global views and the batch
        torch.testing.assert_close(loss_fn.center[t], 0.9 * start[t] + 0.1 * batch_mean, rtol=0, atol=1e-6)


def test_token_count_mismatch_is_an_error() -> None:
    student, teacher = _random_outputs(10)
    with pytest.raises(ValueError, match="token types"):
        PASSLoss(K, num_tokens=1)(student, teacher, 0)


def _center_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from passreid._compat import destroy_process_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, teacher = _random_outputs(20 + rank)
        loss_fn = PASSLoss(K, center_momentum=0.5)
        loss_fn.update_center(teacher)
        torch.save(loss_fn.center, f"{out_dir}/center{rank}.pt")
    finally:
        destroy_process_group()  # dist.destroy_process_group can hang on torch < 2.8


@pytest.mark.slow
def test_centers_are_averaged_over_processes(tmp_path, spawn) -> None:  # noqa: ANN001
    """Two gloo processes with different teacher outputs end with the same center: the mean over both."""
    spawn(_center_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    teachers = [_random_outputs(20 + rank)[1] for rank in range(2)]
    for rank in range(2):
        center = torch.load(tmp_path / f"center{rank}.pt")
        for t in range(4):
            global_mean = torch.cat([teacher.tokens()[t] for teacher in teachers], dim=1).mean(dim=(0, 1))
            torch.testing.assert_close(center[t], 0.5 * global_mean.float(), rtol=0, atol=1e-6)
