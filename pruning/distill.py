"""Knowledge-distillation losses: the student learns from the unpruned teacher's softened outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Distiller", "DynamicKDLoss", "KDLoss"]


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


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, 1)
    return -(p * F.log_softmax(logits, 1)).sum(1).mean()


class DynamicKDLoss(Distiller):
    """DynamicKD (Zhu, Shang et al. 2023): KD whose student side goes through a learnable entropy controller.

    The student's softened output is softmax(alpha * z / T); alpha is a parameter trained only by the
    distillation term, so it scales the student's logits until their output entropy tracks the
    teacher's, narrowing the teacher-student gap instead of changing the teacher. The cross-entropy
    term sees the raw logits, and inference uses the raw logits (argmax is unchanged by alpha > 0).

    >>> loss = DynamicKDLoss(temperature=4.0, alpha=0.9)
    >>> loss(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))).backward()
    >>> loss.metrics()["entropy_controller"]
    1.0
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, init: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        self.controller = nn.Parameter(torch.tensor(float(init)))
        self._sums = {"student_entropy": 0.0, "teacher_entropy": 0.0}
        self._n = 0

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(student, target)
        if teacher is None:
            return ce
        t = self.temperature
        scaled = student * self.controller.clamp_min(1e-3)
        kl = F.kl_div(F.log_softmax(scaled / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
        with torch.no_grad():
            self._sums["student_entropy"] += _entropy(scaled / t).item()
            self._sums["teacher_entropy"] += _entropy(teacher / t).item()
            self._n += 1
        return (1 - self.alpha) * ce + self.alpha * t * t * kl

    def metrics(self) -> dict[str, float]:
        """The controller's value and the mean softened entropies since the last call (logged per epoch)."""
        out = {"entropy_controller": float(self.controller.detach())}
        if self._n:
            out.update({k: v / self._n for k, v in self._sums.items()})
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._n = 0
        return out
