"""PASS part-aware self-distillation loss (DESIGN §3).

Cross-entropy between the teacher's centred, sharpened softmax and the
student's log-softmax, summed over the pairs that DESIGN §3 lists:

- cls term: each teacher global view's cls output against the student's cls
  output of every view (2 global + 9 local), skipping the same view;
- part-k term: each teacher global view's part-k output against the student's
  part-k output of the other global view and of the 3 local crops of band k.

The loss is the mean over all those pairs together (2*10 cls pairs + 3 * 2*4
part pairs = 44 for the published 2 + 9 views). Each token type has its own
running center, because the class token and the three part tokens have
different output statistics; a single center would let one of them collapse.
With one token type (``num_tokens=1``) this is the plain DINO loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.models.heads import TOKEN_NAMES


class ViewLogits(NamedTuple):
    """Head outputs of one network over the views of a batch, view-major.

    Attributes:
        cls: (V, B, K) class-token logits of every view: the global views
            first, then the local crops (band-major for PASS).
        parts: one (Vk, B, K) tensor per part token k: its logits on the global
            views first, then on the local crops of band k. Empty for DINO.
    """

    cls: Tensor
    parts: tuple[Tensor, ...]

    def tokens(self) -> tuple[Tensor, ...]:
        """``(cls, part1, part2, part3)`` (or ``(cls,)``)."""
        return (self.cls, *self.parts)


class PASSLossOutput(NamedTuple):
    """The total loss (scalar, with grad) and detached statistics for logging.

    ``stats`` holds ``loss_cls``, ``loss_part1..3`` (mean over the pairs of that
    term), ``teacher_entropy`` (mean entropy of the teacher's sharpened
    per-image distributions, in nats: near log K when it is uniform) and
    ``teacher_usage_entropy`` (entropy of the batch-averaged distribution: how
    many prototypes the batch uses; near 0 when every image goes to one).
    """

    loss: Tensor
    stats: dict[str, Tensor]


def pair_mask(num_teacher: int, num_student: int, device: torch.device | None = None) -> Tensor:
    """(G, V) bool: True where teacher view g meets student view v, i.e. v != g.

    Teacher views are the first ``num_teacher`` student views, so the pairs
    skipped are the diagonal of the leading square.
    """
    teacher_idx = torch.arange(num_teacher, device=device)[:, None]
    student_idx = torch.arange(num_student, device=device)[None, :]
    return teacher_idx != student_idx


class PASSLoss(nn.Module):
    """Part-aware DINO loss with one running center per token type.

    Args:
        out_dim: number of prototypes K of the heads.
        num_tokens: 4 (cls + 3 parts, PASS) or 1 (plain DINO).
        student_temp: student softmax temperature (0.1).
        teacher_temp: teacher temperature after the warm-up (0.04).
        warmup_teacher_temp: teacher temperature at iteration 0.
        warmup_teacher_temp_iters: iterations of linear warm-up (0: none).
        center_momentum: EMA momentum of the centers (0.9).

    The centers are the buffer ``center`` (num_tokens, K), row t for token t,
    moved by :meth:`update_center` after each step.

    Example:
        >>> loss_fn = PASSLoss(out_dim=8)
        >>> teacher = ViewLogits(torch.randn(2, 4, 8), tuple(torch.randn(2, 4, 8) for _ in range(3)))
        >>> student = ViewLogits(torch.randn(11, 4, 8), tuple(torch.randn(5, 4, 8) for _ in range(3)))
        >>> loss_fn(student, teacher, iteration=0).loss.shape
        torch.Size([])
        >>> loss_fn.update_center(teacher)
    """

    def __init__(
        self,
        out_dim: int,
        num_tokens: int = 4,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_iters: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if num_tokens not in (1, len(TOKEN_NAMES)):
            raise ValueError(f"num_tokens must be 1 (DINO) or {len(TOKEN_NAMES)} (PASS), got {num_tokens}")
        self.num_tokens = num_tokens
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_iters = warmup_teacher_temp_iters
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(num_tokens, out_dim))

    def teacher_temperature(self, iteration: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        if iteration >= self.warmup_teacher_temp_iters:
            return self.teacher_temp
        frac = iteration / self.warmup_teacher_temp_iters
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, student: ViewLogits, teacher: ViewLogits, iteration: int) -> PASSLossOutput:
        """Loss of one batch with the current centers.

        Call :meth:`update_center` with the same teacher output afterwards (the
        training step does so only for finite losses, so that one bad batch
        cannot poison the centers).

        Args:
            student: logits of the student on all views (see :class:`ViewLogits`).
            teacher: logits of the teacher on the global views only, (G, B, K) per token.
            iteration: global training iteration (for the teacher temperature).
        """
        teacher_tokens, student_tokens = teacher.tokens(), student.tokens()
        if len(teacher_tokens) != self.num_tokens or len(student_tokens) != self.num_tokens:
            raise ValueError(
                f"expected {self.num_tokens} token types, got teacher {len(teacher_tokens)}, "
                f"student {len(student_tokens)}"
            )
        temp = self.teacher_temperature(iteration)
        device = teacher.cls.device
        total = torch.zeros((), device=device)
        num_pairs = 0
        stats: dict[str, Tensor] = {}
        entropy = torch.zeros((), device=device)
        usage = torch.zeros((), device=device)
        # Softmax over 65536 prototypes and the pair sums need fp32 even under bf16 autocast.
        with torch.autocast(device_type=device.type, enabled=False):
            for t, (t_logits, s_logits) in enumerate(zip(teacher_tokens, student_tokens)):
                num_global, batch = t_logits.shape[0], t_logits.shape[1]
                q = F.softmax((_at_least_fp32(t_logits.detach()) - self.center[t]) / temp, dim=-1)
                log_p = F.log_softmax(_at_least_fp32(s_logits) / self.student_temp, dim=-1)
                # ce[g, v] = mean over the batch of -sum_k q[g, b, k] * log_p[v, b, k]: one matmul.
                ce = -torch.einsum("gbk,vbk->gv", q, log_p) / batch
                # A float mask, not boolean indexing: indexing would wait for the GPU to count the pairs.
                mask = pair_mask(num_global, s_logits.shape[0], device)
                pairs = num_global * s_logits.shape[0] - min(num_global, s_logits.shape[0])
                term = (ce * mask.to(ce.dtype)).sum()
                total = total + term
                num_pairs += pairs
                stats[f"loss_{TOKEN_NAMES[t]}"] = term.detach() / pairs
                entropy = entropy + torch.special.entr(q).sum(-1).mean().detach()
                usage = usage + torch.special.entr(q.detach().mean(dim=(0, 1))).sum()
            stats["teacher_entropy"] = entropy / self.num_tokens
            stats["teacher_usage_entropy"] = usage / self.num_tokens
        return PASSLossOutput(total / num_pairs, stats)

    @torch.no_grad()
    def update_center(self, teacher: ViewLogits) -> None:
        """``center_t <- m * center_t + (1 - m) * mean_t``, the mean over every teacher output of
        token t in the batch (all global views, all processes)."""
        logits = torch.stack([_at_least_fp32(t) for t in teacher.tokens()])  # (T, G, B, K)
        batch_sum = logits.sum(dim=(1, 2))
        count = logits.shape[1] * logits.shape[2]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum.to(self.center.dtype) / count,
                                                    alpha=1 - self.center_momentum)


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 logits to fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
