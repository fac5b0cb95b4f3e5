"""The adaptive IB controller (METHOD.md 3.3), checked against hand computations."""

from __future__ import annotations

import json
import math
import random

import pytest

from grace_quant.controller import FixedBeta, LagrangianController


def test_reference_defaults():
    c = LagrangianController()
    assert (c.tau, c.eta, c.beta, c.beta_min, c.beta_max, c.ema_decay) == (3.0, 0.003, 0.5, 0.1, 1.0, 0.99)
    assert c.ema is None and c.step == 0


def test_ema_starts_at_the_first_value():
    c = LagrangianController()
    c.update(7.25)
    assert c.ema == 7.25 and c.step == 1
    assert c.beta == pytest.approx(0.5 + 0.003 * (7.25 - 3.0), rel=1e-12)


def test_a_few_steps_by_hand():
    c = LagrangianController(tau=3.0, eta=0.1, beta0=0.5, beta_min=0.1, beta_max=1.0, ema_decay=0.9)
    # x=4.0: ema = 4.0                      beta = 0.5 + 0.1 * (4.0 - 3)   = 0.6
    # x=2.0: ema = 0.9*4.0 + 0.1*2.0 = 3.8  beta = 0.6 + 0.1 * (3.8 - 3)   = 0.68
    # x=3.5: ema = 0.9*3.8 + 0.1*3.5 = 3.77 beta = 0.68 + 0.1 * (3.77 - 3) = 0.757
    # x=0.0: ema = 0.9*3.77          = 3.393 beta = 0.757 + 0.1 * 0.393  = 0.7963
    for x, ema, beta in [(4.0, 4.0, 0.6), (2.0, 3.8, 0.68), (3.5, 3.77, 0.757), (0.0, 3.393, 0.7963)]:
        assert c.update(x) == pytest.approx(beta, rel=1e-12)
        assert c.ema == pytest.approx(ema, rel=1e-12)
        assert c.beta == pytest.approx(beta, rel=1e-12)
    assert c.step == 4


def test_beta_rises_while_ema_above_tau_and_falls_below():
    c = LagrangianController(tau=3.0, eta=0.01, beta0=0.5)
    betas = [c.update(4.0) for _ in range(10)]
    assert all(b2 > b1 for b1, b2 in zip([0.5] + betas[:-1], betas, strict=True))
    assert betas[-1] == pytest.approx(0.5 + 10 * 0.01 * 1.0, rel=1e-12)

    c = LagrangianController(tau=3.0, eta=0.01, beta0=0.5)
    betas = [c.update(2.0) for _ in range(10)]
    assert all(b2 < b1 for b1, b2 in zip([0.5] + betas[:-1], betas, strict=True))
    assert betas[-1] == pytest.approx(0.5 - 10 * 0.01 * 1.0, rel=1e-12)


def test_beta_is_clipped_to_its_bounds():
    c = LagrangianController(tau=1.0, eta=0.5, beta0=0.5, beta_min=0.1, beta_max=1.0, ema_decay=0.5)
    assert c.update(100.0) == 1.0
    assert c.update(100.0) == 1.0
    # the EMA must first come down below tau; then beta falls and stops at beta_min
    betas = [c.update(-100.0) for _ in range(10)]
    assert betas[-1] == 0.1 and min(betas) == 0.1
    assert all(0.1 <= b <= 1.0 for b in betas)


def test_state_round_trip_through_json_continues_identically():
    rng = random.Random(0)
    values = [3.0 + 2.0 * math.sin(i / 4) + rng.uniform(-0.5, 0.5) for i in range(60)]  # oscillates about tau
    a = LagrangianController(eta=0.05, ema_decay=0.9)
    for x in values[:30]:
        a.update(x)
    state = json.loads(json.dumps(a.state_dict()))
    b = LagrangianController(eta=0.05, ema_decay=0.9)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    tail_a = [a.update(x) for x in values[30:]]
    tail_b = [b.update(x) for x in values[30:]]
    assert tail_a == tail_b  # exact, not approximate
    assert (a.ema, a.step) == (b.ema, b.step)
    assert len(set(tail_a)) > 1  # beta actually moved, so the comparison means something


def test_auto_tau_calibrates_on_the_first_steps_then_ascends():
    values = [5.0, 4.0, 3.0, 2.0, 6.0]
    c = LagrangianController(tau="auto", eta=0.1, beta0=0.4, calibration_steps=5, ema_decay=0.5)
    assert c.calibrating and c.tau is None
    for x in values:
        assert c.update(x) == 0.4
    assert not c.calibrating
    assert c.tau == pytest.approx(sum(values) / 5, rel=1e-12)
    # the EMA ran during calibration: 5 -> 4.5 -> 3.75 -> 2.875 -> 4.4375
    assert c.ema == pytest.approx(4.4375, rel=1e-12)
    # first dual-ascent step, on the relative violation: ema = 0.5*4.4375 + 0.5*1.0 = 2.71875;
    # beta = 0.4 + 0.1 * (2.71875 - 4.0) / 4.0 = 0.4 - 0.03203125
    assert c.update(1.0) == pytest.approx(0.36796875, rel=1e-12)


def test_auto_tau_resume_mid_calibration():
    values = [2.0, 3.0, 7.0, 1.0, 4.0, 5.0, 0.5, 9.0]
    a = LagrangianController(tau="auto", calibration_steps=4, eta=0.05)
    for x in values[:2]:
        a.update(x)
    b = LagrangianController(tau="auto", calibration_steps=4, eta=0.05)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.update(x) for x in values[2:]] == [b.update(x) for x in values[2:]]
    assert a.tau == b.tau == pytest.approx(sum(values[:4]) / 4, rel=1e-12)


def test_fixed_beta_is_constant_and_resumable():
    f = FixedBeta(0.3)
    assert [f.update(x) for x in (10.0, 0.0, 5.0)] == [0.3, 0.3, 0.3]
    assert f.step == 3 and f.ema == pytest.approx(0.99 * (0.99 * 10.0) + 0.01 * 5.0, rel=1e-12)
    g = FixedBeta(0.3)
    g.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert g.state_dict() == f.state_dict()
    with pytest.raises(ValueError):
        FixedBeta(-0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 0.0},
        {"eta": -0.1},
        {"beta_min": -0.1},
        {"beta_min": 0.6, "beta0": 0.5},
        {"beta0": 1.5, "beta_max": 1.0},
        {"ema_decay": 0.0},
        {"ema_decay": 1.0},
        {"tau": 0.0},
        {"tau": -3.0},
        {"tau": "calibrate"},
        {"tau": float("nan")},
        {"tau": "auto", "calibration_steps": 0},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LagrangianController(**kwargs)


def test_non_finite_loss_is_refused_without_changing_state():
    c = LagrangianController()
    c.update(3.5)
    before = c.state_dict()
    with pytest.raises(ValueError, match="finite"):
        c.update(float("nan"))
    assert c.state_dict() == before


def test_auto_tau_makes_beta_independent_of_the_loss_scale_and_a_numeric_tau_does_not():
    """Multiplying every GDKD value by a constant (another vocabulary, temperature or beta_dkd) leaves beta's
    trajectory unchanged under tau="auto"; under the paper's absolute tau it changes it."""
    rng = random.Random(1)
    values = [4.2 * math.exp(-i / 150) + rng.uniform(-0.2, 0.2) for i in range(400)]  # falls as training goes

    def betas(tau, scale):
        c = LagrangianController(tau=tau, calibration_steps=20)
        return [c.update(scale * x) for x in values]

    base = betas("auto", 1.0)
    for scale in (0.25, 7.0):
        assert betas("auto", scale) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert len(set(base)) > 10  # beta moved, so the comparison means something
    assert betas(3.0, 1.0) != pytest.approx(betas(3.0, 7.0), rel=1e-3)


def test_auto_tau_moves_beta_as_the_paper_does_when_the_calibrated_tau_is_the_papers():
    """At the paper's own budget (tau = 3.0) the relative step with the default eta equals the paper's step."""
    tail = [3.5, 4.0, 2.0, 2.5, 3.2]
    auto = LagrangianController(tau="auto", calibration_steps=2)
    auto.update(2.0)
    auto.update(4.0)  # calibrated tau = 3.0
    paper = LagrangianController(tau=3.0)
    paper.ema = auto.ema  # the same EMA from here on
    assert (auto.tau, auto.eta, paper.eta) == (3.0, pytest.approx(0.009), 0.003)
    assert [auto.update(x) for x in tail] == pytest.approx([paper.update(x) for x in tail], rel=1e-12)


def test_bound_flag():
    c = LagrangianController(tau=1.0, eta=0.5, ema_decay=0.5)
    assert c.at_bound == 0
    c.update(100.0)
    assert c.at_bound == 1
    for _ in range(5):
        c.update(-100.0)
    assert c.at_bound == -1
