"""The inversion: fit force constants θ to measured TDS.

Model of the data: I_model(Q) = s · I(Q; θ) + b, with I from a TDSModel (e.u./atom), a global scale s
(free, or fixed to 1 for absolute data) and a constant background b (free or none).
Loss: χ² = Σ_used ((I_model − I_obs)/σ)² (default), with s and b eliminated in closed form at every θ
(variable projection), or the Poisson deviance (s, b optimised with θ). Optimiser: L-BFGS (scipy) for
the deterministic models, Adam for "sampling". A step that makes the crystal dynamically unstable is
rejected (the line search backtracks), never turned into NaN.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

from .covariance import UnstableError
from .data import TDSData
from .tds import TDSModel

LOSSES = ("chi2", "poisson")


@dataclass
class FitResult:
    """Fitted θ with labels, 1σ (Gauss–Newton), correlation, χ² and the settings used.

    theta, sigma: (n_params,) eV/Å²; covariance, correlation: (n_params, n_params); scale, background:
    the nuisance values (e.u.); chi2_red = χ²/(N_used − n_free).
    """

    labels: list
    theta: np.ndarray
    sigma: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    scale: float
    background: float
    chi2: float
    chi2_red: float
    n_points: int
    iterations: int
    settings: dict
    warnings: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'label':<14}{'value':>12}{'1σ':>11}  unit"]
        lines += [f"{k:<14}{v:>12.5f}{s:>11.5f}  eV/Å²" for k, v, s in zip(self.labels, self.theta, self.sigma)]
        lines.append(f"scale {self.scale:.6g}, background {self.background:.6g} e.u., "
                     f"χ²_red {self.chi2_red:.4g} on {self.n_points} points")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        import ase
        import phonopy

        from . import __version__

        return {
            "parameters": [{"label": k, "value": float(v), "sigma": float(s), "unit": "eV/Å²"}
                           for k, v, s in zip(self.labels, self.theta, self.sigma)],
            "correlation": self.correlation.tolist(),
            "scale": self.scale, "background": self.background,
            "chi2": self.chi2, "chi2_red": self.chi2_red, "n_points": self.n_points,
            "iterations": self.iterations, "settings": self.settings, "warnings": self.warnings,
            "versions": {"ase_tds": __version__, "torch": torch.__version__, "ase": ase.__version__,
                         "phonopy": phonopy.__version__, "numpy": np.__version__, "python": platform.python_version()},
        }

    def write_json(self, path) -> None:
        """Write `to_dict()` as JSON atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        os.replace(tmp, path)


class _Objective:
    """Loss and gradient in θ for scipy, with the nuisance parameters profiled or carried along."""

    def __init__(self, tds: TDSModel, data: TDSData, scale: str, background: str, loss: str):
        fc = tds.force_constants
        used = np.asarray(data.mask, dtype=bool)
        self.tds, self.loss, self.scale_mode, self.background_mode = tds, loss, scale, background
        as_t = lambda x: torch.as_tensor(np.asarray(x, dtype=float)[used], dtype=fc.theta.dtype, device=fc.theta.device)
        self.q = as_t(data.q)
        self.y = as_t(data.intensity)
        sigma = data.sigma if data.sigma is not None else np.sqrt(np.maximum(np.abs(data.intensity), 1e-12))
        self.w = 1.0 / as_t(sigma) ** 2
        self.n_theta = fc.n_params

    def nuisance(self, intensity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted least-squares (s, b) for a model intensity (N,), differentiable."""
        w, y = self.w, self.y
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        if self.scale_mode == "fixed":
            s = torch.ones((), dtype=y.dtype, device=y.device)
            b = (w * (y - intensity)).sum() / w.sum() if self.background_mode == "free" else zero
            return s, b
        if self.background_mode == "none":
            return (w * intensity * y).sum() / (w * intensity**2).sum(), zero
        a = torch.stack([torch.stack([(w * intensity**2).sum(), (w * intensity).sum()]),
                         torch.stack([(w * intensity).sum(), w.sum()])])
        rhs = torch.stack([(w * intensity * y).sum(), (w * y).sum()])
        s, b = torch.linalg.solve(a, rhs)
        return s, b

    def evaluate(self, theta: np.ndarray, extra: np.ndarray | None = None):
        """(loss, grad θ, s, b) at θ; raises UnstableError where the crystal is unstable."""
        fc = self.tds.force_constants
        with torch.no_grad():
            fc.theta.copy_(torch.as_tensor(theta))
        fc.theta.grad = None
        intensity = self.tds(self.q)
        s, b = self.nuisance(intensity)
        if extra is not None:  # Poisson: s, b are optimiser variables
            s, b = [torch.as_tensor(v, dtype=intensity.dtype).requires_grad_(True) for v in extra]
        model = s * intensity + b
        if self.loss == "chi2":
            value = (self.w * (model - self.y) ** 2).sum()
        else:
            # deviance in counts units: counts ≈ I/σ² (Poisson σ² ∝ I)
            mu, obs = model * self.w * self.y, self.y**2 * self.w
            mu = torch.clamp(mu, min=1e-12)
            value = 2 * (obs * torch.log(torch.clamp(obs, min=1e-12) / mu) - (obs - mu)).sum()
        value.backward()
        grad = fc.theta.grad.detach().cpu().numpy().copy()
        if extra is not None:
            grad = np.concatenate([grad, [float(s.grad), float(b.grad)]])
        return float(value.detach()), grad, float(s.detach()), float(b.detach())


def fit(model, data: TDSData, temperature: float | None = None, method: str = "gaussian",
        statistics: str = "quantum", scale: str = "free", background: str = "free", loss: str = "chi2",
        max_iter: int = 200, rtol: float = 1e-9, gtol: float = 1e-6, progress: bool = True,
        checkpoint=None, tds_options: dict | None = None) -> FitResult:
    """Fit `model` (a ForceConstantModel, fitted in place from its current θ) to `data`.

    scale: "free" | "fixed" (fixed needs absolute data, units "e.u./atom"); background: "free" | "none";
    loss: "chi2" | "poisson"; rtol: stop on relative χ² change; gtol: stop on the projected gradient.
    checkpoint: a file updated with θ after each iteration; an existing one is resumed from.
    tds_options: extra TDSModel arguments (grid, dw_mesh, form_factors, sampler, ...).
    Returns a FitResult; `model.theta` holds the fitted values.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if scale not in ("free", "fixed") or background not in ("free", "none"):
        raise ValueError("scale must be 'free' or 'fixed' and background 'free' or 'none'")
    if scale == "fixed" and not data.absolute:
        raise ValueError("scale='fixed' needs absolute data (units 'e.u./atom'); the data are in arbitrary units — "
                         "use scale='free'")
    if data.cell is not None:
        data.check_cell(model.unitcell.cell[:], "the model's structure")
    temperature = data.require_temperature(temperature)
    tds = TDSModel(model, temperature, method=method, statistics=statistics, **(tds_options or {}))
    objective = _Objective(tds, data, scale, background, loss)
    if len(objective.y) <= model.n_params + 2:
        raise ValueError(f"only {len(objective.y)} data points are used for {model.n_params} parameters; "
                         "widen the mask or use fewer shells")
    start = model.theta.detach().cpu().numpy().copy()
    if checkpoint is not None and Path(checkpoint).exists():
        start = np.array(json.loads(Path(checkpoint).read_text())["theta"], dtype=float)
    try:
        value0, _, s0, b0 = objective.evaluate(start)
    except UnstableError as err:
        raise UnstableError(f"the starting force constants are dynamically unstable ({err}); start from EMT, "
                            "from a stable phonopy file, or from scaled-down constants") from err
    history = [value0]
    if method == "sampling":
        theta, iterations = _adam(objective, start, max_iter, progress, history, checkpoint)
    else:
        theta, iterations = _lbfgs(objective, start, loss, (s0, b0), max_iter, rtol, gtol, progress, history, checkpoint)
    return _result(model, tds, objective, theta, iterations, history,
                   dict(method=method, statistics=statistics, temperature=temperature, scale=scale,
                        background=background, loss=loss, grid=list(tds.grid), dw_mesh=tds.dw_mesh))


def _lbfgs(objective, start, loss, nuisance0, max_iter, rtol, gtol, progress, history, checkpoint):
    n = objective.n_theta
    extra = loss == "poisson"
    # θ = R⁻¹x (R from the Gauss–Newton matrix at the start) makes the far shells as visible as the first
    whiten = np.eye(len(start) + 2) if extra else np.eye(len(start))
    whiten[:n, :n] = _whitening(objective, start)
    unwhiten = np.linalg.inv(whiten)
    x0 = whiten @ (np.concatenate([start, nuisance0]) if extra else start)
    last = {"value": history[0]}
    bar = tqdm(total=max_iter, desc="fit (L-BFGS)", disable=not progress)

    def fun(x):
        theta = unwhiten @ x
        try:
            value, grad, _, _ = objective.evaluate(theta[:n], theta[n:] if extra else None)
        except UnstableError:
            # reject: a large value makes the line search backtrack toward the stable side
            return 1e6 * (abs(last["value"]) + 1.0), np.zeros_like(x)
        last["value"] = value
        return value, unwhiten.T @ grad

    def callback(xk):
        history.append(last["value"])
        bar.update(1)
        bar.set_postfix(chi2=f"{last['value']:.6g}")
        if checkpoint is not None:
            _write_checkpoint(checkpoint, (unwhiten @ xk)[:n])

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                   options=dict(maxiter=max_iter, ftol=rtol, gtol=gtol, maxcor=20))
    bar.close()
    return (unwhiten @ res.x)[:n], int(res.nit)


def _adam(objective, start, steps, progress, history, checkpoint, lr: float = 0.02):
    theta = torch.tensor(start, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    best = (history[0], start.copy())
    for _ in tqdm(range(steps), desc="fit (Adam)", disable=not progress):
        try:
            value, grad, _, _ = objective.evaluate(theta.detach().numpy())
        except UnstableError:
            with torch.no_grad():  # back off half way to the best stable point
                theta.copy_(0.5 * (theta + torch.as_tensor(best[1])))
            continue
        history.append(value)
        if value < best[0]:
            best = (value, theta.detach().numpy().copy())
        opt.zero_grad()
        theta.grad = torch.as_tensor(grad)
        opt.step()
        if checkpoint is not None:
            _write_checkpoint(checkpoint, theta.detach().numpy())
    return theta.detach().numpy(), steps


def _write_checkpoint(path, theta) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"theta": np.asarray(theta).tolist()}))
    os.replace(tmp, path)


@torch.no_grad()
def _jacobian(tds, q: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """∂I/∂θ (B, n_params) at θ by central differences (steps 1e-4·max(|θ_k|, 0.01) eV/Å²)."""
    fc = tds.force_constants
    fc.theta.copy_(torch.as_tensor(theta))
    columns = []
    for k in range(fc.n_params):
        step = torch.zeros_like(fc.theta)
        step[k] = 1e-4 * max(abs(theta[k]), 1e-2)
        fc.theta.add_(step)
        plus = tds(q)
        fc.theta.sub_(2 * step)
        minus = tds(q)
        fc.theta.add_(step)
        columns.append((plus - minus) / (2 * step[k]))
    return torch.stack(columns, dim=1)


def _whitening(objective, theta: np.ndarray, n_points: int = 256) -> np.ndarray:
    """R (n, n) with RᵀR ≈ the Gauss–Newton matrix at θ on a subset of points: x = Rθ is well scaled."""
    pick = torch.as_tensor(np.linspace(0, len(objective.q) - 1, min(n_points, len(objective.q))).astype(int))
    jac = _jacobian(objective.tds, objective.q[pick], theta) * torch.sqrt(objective.w[pick])[:, None]
    normal = (jac.T @ jac).cpu().numpy()
    normal += 1e-9 * np.trace(normal) / len(normal) * np.eye(len(normal))
    return np.linalg.cholesky(normal).T


def _result(model, tds, objective, theta, iterations, history, settings) -> FitResult:
    """Final evaluation, Gauss–Newton covariance from a central-difference Jacobian of I(Q; θ)."""
    fc = model
    with torch.no_grad():
        fc.theta.copy_(torch.as_tensor(theta))
        intensity = tds(objective.q)
        s, b = objective.nuisance(intensity)
        chi2 = float((objective.w * (s * intensity + b - objective.y) ** 2).sum())
        columns = [s * _jacobian(tds, objective.q, theta)]
        nuisance = [] if objective.scale_mode == "fixed" else [intensity[:, None]]
        nuisance += [] if objective.background_mode == "none" else [torch.ones_like(intensity)[:, None]]
        jac = torch.cat(columns + nuisance, dim=1) * torch.sqrt(objective.w)[:, None]
    jac = jac.cpu().numpy()
    n_free = jac.shape[1]
    n_points = len(objective.y)
    normal = jac.T @ jac
    cov = np.linalg.pinv(normal)[: fc.n_params, : fc.n_params]
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    corr = cov / np.outer(np.where(sigma > 0, sigma, 1), np.where(sigma > 0, sigma, 1))
    notes = _identifiability(fc.labels, corr, normal, objective.scale_mode)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return FitResult(labels=list(fc.labels), theta=np.asarray(theta, dtype=float), sigma=sigma, covariance=cov,
                     correlation=corr, scale=float(s), background=float(b), chi2=chi2,
                     chi2_red=chi2 / max(n_points - n_free, 1), n_points=n_points, iterations=iterations,
                     settings=settings, warnings=notes, history=[float(h) for h in history])


def _identifiability(labels, corr, normal, scale_mode) -> list[str]:
    notes = []
    if scale_mode == "free":
        notes.append("the intensity scale is free: the overall magnitude of the force constants is then set only "
                     "by the Debye–Waller and multi-phonon terms, and is correlated with the scale")
    eig = np.linalg.eigvalsh(normal)
    if eig[0] <= 1e-12 * eig[-1]:
        notes.append(f"the parameters are (nearly) degenerate: condition number {eig[-1] / max(eig[0], 1e-300):.3g}")
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            if abs(corr[i, j]) > 0.98:
                notes.append(f"{labels[i]} and {labels[j]} are strongly correlated (ρ = {corr[i, j]:+.3f})")
    return notes
