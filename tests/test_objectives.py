"""Clipped objectives: exact values and gradients computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pcpo_hydra.algorithms import log_hinge_objective, ratio_objective


def loss_and_grad(objective, log_r: list[float], adv: list[float], eps: float):
    x = torch.tensor(log_r, dtype=torch.float64, requires_grad=True)
    loss, clipped = objective(x, torch.tensor(adv, dtype=torch.float64), eps)
    loss.sum().backward()
    return loss.tolist(), clipped.tolist(), x.grad.tolist()


def test_ratio_objective_by_hand():
    # rho = 1, 1.5, 0.5, 0.5, 1.5 with eps 0.2
    log_r = [0.0, math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)]
    adv = [1.0, 1.0, -1.0, 1.0, 0.0]
    loss, clipped, grad = loss_and_grad(ratio_objective, log_r, adv, 0.2)
    # -A rho vs -A clip(rho): -1|-1, -1.5|-1.2, 0.5|0.8, -0.5|-0.8, 0|0
    assert loss == pytest.approx([-1.0, -1.2, 0.8, -0.5, 0.0], rel=1e-12)
    assert clipped == [False, True, True, True, True]  # outside [0.8, 1.2], whether or not it binds
    # d(-A rho)/d log rho = -A rho where the clip does not bind, 0 where it does
    assert grad == pytest.approx([-1.0, 0.0, 0.0, -0.5, 0.0], abs=1e-12)


def test_log_hinge_objective_by_hand():
    log_r = [0.05, 0.3, -0.3, -0.3, 0.0]
    adv = [2.0, 1.0, -1.0, 1.0, 3.0]
    loss, clipped, grad = loss_and_grad(log_hinge_objective, log_r, adv, 0.1)
    # -A r vs -A clip(r, -0.1, 0.1): -0.1|-0.1, -0.3|-0.1, -0.3|-0.1, 0.3|0.1, 0|0
    assert loss == pytest.approx([-0.1, -0.1, -0.1, 0.3, 0.0], rel=1e-12)
    assert clipped == [False, True, True, True, False]
    assert grad == pytest.approx([-2.0, 0.0, 0.0, -1.0, -3.0], abs=1e-12)


def test_both_objectives_share_the_gradient_at_zero_log_ratio():
    adv = [0.7, -1.3]
    _, _, g_ratio = loss_and_grad(ratio_objective, [0.0, 0.0], adv, 1e-4)
    _, _, g_hinge = loss_and_grad(log_hinge_objective, [0.0, 0.0], adv, 1e-4)
    assert g_ratio == pytest.approx(g_hinge, abs=1e-15) and g_hinge == pytest.approx([-0.7, 1.3])
