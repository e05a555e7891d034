"""Distillation losses behave as their definitions say."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.distill import Distiller, DynamicKDLoss, KDLoss


def test_kd_reduces_to_ce_without_teacher_and_zero_alpha():
    s, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    ce = F.cross_entropy(s, y)
    assert torch.allclose(KDLoss(alpha=0.0)(s, torch.randn(16, 10), y), ce)
    assert torch.allclose(KDLoss()(s, None, y), ce)
    assert torch.allclose(Distiller()(s, None, y), ce)


def test_kd_term_vanishes_when_student_matches_teacher_and_pulls_towards_it():
    t, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    loss = KDLoss(temperature=4.0, alpha=1.0)
    assert loss(t.clone(), t, y).item() < 1e-6
    s = torch.zeros(16, 10, requires_grad=True)
    loss(s, t, y).backward()
    with torch.no_grad():
        stepped = s - 10.0 * s.grad
    assert loss(stepped, t, y) < loss(s.detach(), t, y)


def test_dynamickd_controller_learns_to_match_the_teacher_entropy():
    torch.manual_seed(0)
    teacher = torch.randn(64, 10) * 4.0           # confident teacher: low entropy
    student = (teacher / 4.0).detach()            # same ranking, softer: higher entropy
    y = teacher.argmax(1)
    loss = DynamicKDLoss(temperature=1.0, alpha=1.0)
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    start = loss.metrics()["entropy_controller"]
    for _ in range(100):
        opt.zero_grad()
        loss(student, teacher, y).backward()
        opt.step()
    loss.metrics()  # reset the running means, then measure the trained controller alone
    loss(student, teacher, y)
    m = loss.metrics()
    assert start == 1.0 and m["entropy_controller"] > 2.0  # it sharpens the student's outputs
    assert abs(m["student_entropy"] - m["teacher_entropy"]) < 0.1
    assert torch.allclose(DynamicKDLoss()(student, None, y), F.cross_entropy(student, y))
