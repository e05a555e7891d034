"""Knowledge-distillation losses: the student learns from the unpruned teacher's softened outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Distiller", "KDLoss"]


class Distiller(nn.Module):
    """A training loss: `loss(student_logits, teacher_logits, targets) -> scalar`; `teacher_logits` may be None."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student, target)


class KDLoss(Distiller):
    """Vanilla KD (Hinton et al. 2015): (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T).

    >>> loss = KDLoss(temperature=4.0, alpha=0.9)
    >>> loss(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))).shape
    torch.Size([])
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(student, target)
        if teacher is None:
            return ce
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
        return (1 - self.alpha) * ce + self.alpha * t * t * kl
