"""The adaptive Information-Bottleneck controller of GRACE (METHOD.md section 3.3).

GRACE solves ``min L_CE  s.t.  L_GDKD <= tau`` by projected dual ascent on the Lagrange multiplier
``beta`` of ``L_CE + beta (L_GDKD - tau)``, once per optimizer step:

    ema  <- d * ema + (1 - d) * L_GDKD          (ema starts at the first value)
    beta <- clip(beta + eta * (ema - tau), beta_min, beta_max)            (numeric tau: the paper's)
    beta <- clip(beta + eta * (ema - tau) / tau, beta_min, beta_max)      (tau="auto": ours, scale-free)

Feed ``update`` the GDKD mean over all gradient-accumulation micro-batches and all ranks, so that
``beta`` is identical everywhere. The state is plain numbers (JSON-serialisable) for exact resume.
"""

from __future__ import annotations

import math
from typing import Any, Literal

__all__ = ["FixedBeta", "LagrangianController", "PAPER_ETA", "PAPER_TAU", "RELATIVE_ETA"]

#: the paper's reference budget and dual step (absolute GDKD units)
PAPER_TAU = 3.0
PAPER_ETA = 0.003
#: the dual step per unit of *relative* violation that moves beta as the paper does at its own budget:
#: eta * (ema - tau) = (eta * tau) * (ema - tau) / tau
RELATIVE_ETA = PAPER_ETA * PAPER_TAU


def default_eta(tau: float | str) -> float:
    """The dual step of ``tau``'s mode: the paper's for a numeric budget, its equivalent per relative violation
    for ``"auto"``."""
    return RELATIVE_ETA if tau == "auto" else PAPER_ETA


def check_calibration_steps(steps: int) -> None:
    """Refuse a calibration length that is not a whole number of steps >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"calibration_steps must be an int >= 1, got {steps!r}")


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class LagrangianController:
    """Projected dual ascent on ``beta`` with an EMA of the GDKD loss (defaults: the paper's reference values).

    ``tau="auto"`` (ours): the first ``calibration_steps`` updates only observe; ``beta`` stays at ``beta0``
    (the EMA still runs), then ``tau`` is set to the arithmetic mean of those GDKD values and dual ascent
    starts with the next update, on the *relative* violation ``(ema - tau) / tau``. Multiplying every GDKD value
    by a constant then multiplies ``tau`` and ``ema`` alike and leaves ``beta``'s trajectory unchanged, so the
    budget does not depend on the vocabulary, temperature, alpha or beta_dkd. ``beta`` rises while the EMA is
    above the early-training level and falls once distillation has brought the loss below it.
    ``eta=None`` takes :func:`default_eta`: the paper's 0.003 for a numeric ``tau``, 0.009 for ``"auto"`` (the
    same move of ``beta`` as the paper's when the calibrated ``tau`` is the paper's 3.0).
    """

    def __init__(
        self,
        tau: float | Literal["auto"] = PAPER_TAU,
        eta: float | None = None,
        beta0: float = 0.5,
        beta_min: float = 0.1,
        beta_max: float = 1.0,
        ema_decay: float = 0.99,
        calibration_steps: int = 20,
    ) -> None:
        if isinstance(tau, str):
            if tau != "auto":
                raise ValueError(f'tau must be a positive number or "auto", got {tau!r}')
        elif not (math.isfinite(tau) and tau > 0):
            raise ValueError(f'tau must be a positive number or "auto", got {tau!r}')
        eta = default_eta(tau) if eta is None else eta
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be > 0, got {eta}")
        if not (0 <= beta_min <= beta0 <= beta_max and math.isfinite(beta_max)):
            raise ValueError(
                f"need 0 <= beta_min <= beta0 <= beta_max < inf, got beta_min={beta_min}, beta0={beta0}, "
                f"beta_max={beta_max}"
            )
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        check_calibration_steps(calibration_steps)

        self.auto_tau = tau == "auto"
        self.tau: float | None = None if self.auto_tau else float(tau)
        self.eta = float(eta)
        self.beta0 = float(beta0)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.ema_decay = float(ema_decay)
        self.calibration_steps = calibration_steps

        self.beta = self.beta0
        self.ema: float | None = None
        self.step = 0
        self.calibration_sum = 0.0

    @property
    def at_bound(self) -> int:
        """+1 when ``beta`` sits at ``beta_max``, -1 at ``beta_min``, 0 in between (for the logs)."""
        return 1 if self.beta >= self.beta_max else (-1 if self.beta <= self.beta_min else 0)

    def set_calibration_steps(self, steps: int) -> None:
        """Set the calibration length once the run's length is known (a hyper-parameter, not state)."""
        check_calibration_steps(steps)
        self.calibration_steps = steps

    @property
    def calibrating(self) -> bool:
        """True while ``tau="auto"`` is still collecting its calibration values."""
        return self.tau is None

    def update(self, gdkd_mean: float) -> float:
        """One optimizer step: fold ``gdkd_mean`` into the EMA, take a projected dual-ascent step, return beta."""
        x = _finite(gdkd_mean, "gdkd_mean")
        self.step += 1
        self.ema = x if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * x
        if self.calibrating:
            self.calibration_sum += x
            if self.step >= self.calibration_steps:
                self.tau = self.calibration_sum / self.step
            return self.beta
        violation = self.ema - self.tau
        if self.auto_tau and self.tau > 0:  # a calibrated tau of exactly 0 (student = teacher) stays absolute
            violation /= self.tau
        self.beta = min(max(self.beta + self.eta * violation, self.beta_min), self.beta_max)
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state for exact resume."""
        return {
            "beta": self.beta,
            "ema": self.ema,
            "step": self.step,
            "tau": self.tau,
            "auto_tau": self.auto_tau,
            "calibration_sum": self.calibration_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (hyperparameters come from the constructor)."""
        missing = {"beta", "ema", "step", "tau"} - set(state)
        if missing:
            raise KeyError(f"controller state lacks {sorted(missing)}")
        self.beta = float(state["beta"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.step = int(state["step"])
        self.tau = None if state["tau"] is None else float(state["tau"])
        self.auto_tau = bool(state.get("auto_tau", self.tau is None))
        self.calibration_sum = float(state.get("calibration_sum", 0.0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, ema={self.ema}, tau={self.tau}, step={self.step})"


class FixedBeta:
    """Constant ``beta`` with the controller's interface (the "no controller" ablation); still tracks the EMA."""

    def __init__(self, beta: float = 0.5, ema_decay: float = 0.99) -> None:
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.beta = float(beta)
        self.ema_decay = float(ema_decay)
        self.ema: float | None = None
        self.step = 0

    def update(self, gdkd_mean: float) -> float:
        """Track the EMA for logging; ``beta`` never changes."""
        x = _finite(gdkd_mean, "gdkd_mean")
        self.step += 1
        self.ema = x if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * x
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state."""
        return {"beta": self.beta, "ema": self.ema, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.beta = float(state["beta"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, ema={self.ema}, step={self.step})"
