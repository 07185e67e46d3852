"""The loss of a fit as a function of θ: the profiled χ² (or Poisson deviance) of the data, and its gradient.

Model of the data: m(Q) = s · I(Q; θ) + b + A · c(|Q|), with I from a forward model (e.u./atom), a global scale s (free,
or fixed to 1 for absolute data), a constant background b (free or none) and optionally the incoherent (Compton)
scattering c with a free amplitude A (`ase_tds.background`). s, b, A are eliminated at every θ (variable
projection). Loss: χ² = Σ_used ((m − I_obs)/σ)² (default) or the Poisson deviance of the counts.

θ enters only through `Objective.evaluate(θ)`, `intensity(θ)` and `jacobian(θ)`, which write it into the model with
`set_theta`: the one place a fit moves the model's parameter.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..background import Nuisance, poisson_deviance
from ..data import TDSData
from . import model_error

LOSSES = ("chi2", "poisson")
CHUNK_POINTS = 20000  # points per chunk of the loss and gradient: memory is set by a chunk, not by the data


def set_theta(model, theta) -> None:
    """Write θ (n,) eV/Å² (array or tensor) into `model.theta`, outside autograd.

    Args:
        model (ForceConstantModel): the force constants whose parameter is set.
        theta (array_like | torch.Tensor): θ (n,) eV/Å².
    """
    with torch.no_grad():
        model.theta.copy_(torch.as_tensor(theta))


@contextlib.contextmanager
def fixed_noise(tds):
    """For finite differences of the sampling model: common random numbers (a seed) while inside."""
    sampler = getattr(tds, "sampler", None)
    if not tds.monte_carlo or sampler.seed is not None:
        yield
        return
    sampler.seed = 0
    try:
        yield
    finally:
        sampler.seed = None


def fingerprint(data: TDSData) -> str:
    """A short hash of the used points (Q, intensity, σ): a checkpoint of other data is refused."""
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    digest = hashlib.sha256()
    for array in (data.q, data.intensity, data.sigma):
        if array is not None:
            digest.update(np.ascontiguousarray(np.asarray(array, dtype=float)[used]).tobytes())
    return digest.hexdigest()[:16]


class Objective:
    """The profiled loss of θ and its gradient, for the optimisers.

    Under torch.distributed each rank holds its shard of the used points (`distributed.shard`) and every sum over
    points is all-reduced. The loss and its gradient are accumulated over chunks of CHUNK_POINTS points, so that
    memory is set by a chunk, not by the number of points: a first pass without autograd gives the intensities
    for the nuisance values β, then each chunk's loss at that β is differentiated on its own (at the optimal β
    this is the gradient of the profiled loss: the envelope theorem).

    The weights w = 1/variance are built here, once: the data's 1/σ² (`data_w`; for the Poisson loss 1/max(n, 1)
    counts), plus, when `theta` is given, the forward model's own variance measured at that θ — for "gaussian"
    its discretisation error (after moving points to larger crystals, `model_error.choose_crystals`), for
    "sampling" with χ² the Monte-Carlo variance of its fixed-seed estimate (`_monte_carlo_variance`).

    Args:
        tds (ForwardModel): the forward model.
        data: the TDSData; its mask selects the points used.
        scale: "free" | "fixed".
        background: "free" | "none".
        loss: "chi2" | "poisson".
        compton (bool | Callable): the Compton term (`Nuisance`).
        exposure (float | array_like | None): counts per unit of intensity, for loss="poisson" (`fit`).
        theta (array_like | None): θ (n,) at which the model's own variance is measured (None: the data's
            weights alone).
        prior (tuple | None): (θ₀ (n,), σ_p): the ridge Σ((θ − θ₀)/σ_p)² added to the loss.
        progress: a progress bar over the chunks of each evaluation (when there are 5 chunks or more).

    Raises:
        ValueError: no more used points than free parameters, loss="poisson" under torchrun, or data the Poisson
            loss cannot take.
    """

    def __init__(self, tds, data: TDSData, scale: str, background: str, loss: str, compton=False, exposure=None, *,
                 theta=None, prior=None, progress: bool = False):
        fc = tds.force_constants
        if loss == "poisson" and distributed.size() > 1:
            raise ValueError("loss='poisson' runs on one process; shard a chi2 fit over ranks, or run without torchrun")
        everywhere = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
        used = everywhere[distributed.shard(len(everywhere))]  # this rank's points (all of them on one process)
        self.tds, self.loss, self.prior, self.n_theta = tds, loss, prior, fc.n_params
        self.n_total = len(everywhere)
        self.q, self.y = self._tensor(data.q[used]), self._tensor(data.intensity[used])
        self.chunks = [slice(k, k + CHUNK_POINTS) for k in range(0, len(used), CHUNK_POINTS)] or [slice(0, 0)]
        self.progress = progress and len(self.chunks) >= 5  # an evaluation of ≥ 10⁵ points takes seconds
        self.nuisance = Nuisance(scale, background, compton, np.linalg.norm(data.q[used], axis=1),
                                 fc.primitive.get_chemical_symbols(), fc.dtype, fc.device)
        self.scale_mode, self.background_mode, self.compton = scale, background, compton
        if self.n_total <= self.n_theta + self.nuisance.n_free:
            raise ValueError(f"only {self.n_total} data points are used for {self.n_theta} parameters "
                             f"(+ {self.nuisance.n_free} nuisance); widen the mask or use fewer shells")
        self.exposure = self.counts = None
        if loss == "poisson":
            self.exposure = self._tensor(_exposure(data, exposure, used, len(data)))
            self.counts = self.exposure * self.y
            self.data_w = self.exposure**2 / torch.clamp(self.counts, min=1.0)  # 1/σ², σ = √max(n, 1)/t
        else:
            sigma = data.sigma if data.sigma is not None else np.sqrt(np.maximum(np.abs(data.intensity), 1e-12))
            self.data_w = 1.0 / self._tensor(sigma[used]) ** 2
        self._beta = None  # the Poisson profile's last β, its next start
        self.levels = None  # the gaussian model's crystal per point (None: its own choice)
        self.model_variance = torch.zeros_like(self.data_w)  # δ² of the gaussian model's own error, data units²
        self.model_error = {}  # its record (FitResult.model_error)
        extra = None if theta is None else self._model_variance(theta)
        self.w = self.data_w if extra is None else 1.0 / (1.0 / self.data_w + extra)

    def _tensor(self, x) -> torch.Tensor:
        fc = self.tds.force_constants
        return torch.as_tensor(np.asarray(x, dtype=float), dtype=fc.dtype, device=fc.device)

    def _model_variance(self, theta):
        """The variance (N,) the forward model adds at θ (None: none), and its record in `model_error`."""
        method = self.tds.method
        if self.tds.monte_carlo and self.loss == "chi2":
            self.model_error = model_error.without_grid(method)
            return self._monte_carlo_variance(theta)
        if not self.tds.has_grid:
            self.model_error = model_error.without_grid(method)
            return None
        sigma = 1.0 / torch.sqrt(self.data_w)
        with torch.no_grad():
            intensity = self.intensity(theta)
            scale = abs(self.nuisance.values(self.profile(intensity, self.data_w))["scale"])
        self.levels, delta, self.model_error = model_error.choose_crystals(self.tds, self.q, sigma, scale, intensity,
                                                                           self.n_total)
        self.model_variance = delta**2
        return self.model_variance

    def _monte_carlo_variance(self, theta) -> torch.Tensor:
        """"sampling" with χ²: (r·I_obs)² (N,), r the relative Monte-Carlo standard error of the fixed-seed estimate
        at θ (the start): the speckle of S samples, ≈ 1/√S per point, which θ hardly changes (unlike the standard
        error itself, which follows I(θ)). Where the sampled mean is not positive (near Bragg peaks) r is the median
        of the others; r = 0 where the error is exactly 0 (Q = 0). With the data's σ alone the fit would chase the
        fixed samples' speckle where σ is smallest."""
        set_theta(self.tds.force_constants, theta)
        with torch.no_grad():
            mean, stderr = self.tds.intensity(self.q)
        positive = mean > 0
        relative = torch.where(positive, stderr / torch.where(positive, mean, 1.0), 0.0)
        typical = distributed.gathered(relative[positive])  # the median of all ranks' points
        typical = typical.median() if len(typical) else relative.new_zeros(())
        relative = torch.where(positive | (stderr == 0), relative, typical)
        return (relative * self.y) ** 2

    def intensity(self, theta, pick=None) -> torch.Tensor:
        """The model's I (N,) e.u./atom at θ (n,) at the used points (or at `pick` of them)."""
        set_theta(self.tds.force_constants, theta)
        return self._intensity(pick)

    def _intensity(self, pick=None) -> torch.Tensor:
        """I at the model's current θ (inside `evaluate`, whose graph must keep θ unchanged)."""
        q = self.q if pick is None else self.q[pick]
        if not self.tds.has_grid:
            return self.tds(q)
        return self.tds(q, None if self.levels is None else (self.levels if pick is None else self.levels[pick]))

    @torch.no_grad()
    def profile(self, intensity: torch.Tensor, weights=None) -> torch.Tensor:
        """The best nuisance values β (k,) at a model intensity (N_local,) of this rank's points (all ranks'
        normal equations summed for χ², with `weights`, default the fit's; Poisson on one process)."""
        if self.loss == "chi2":
            weights = self.w if weights is None else weights
            fixed, x = self.nuisance.design(intensity)
            if not self.nuisance.names:
                return x.new_zeros(0)
            xw = x * weights[:, None]
            return torch.linalg.solve(distributed.total(xw.T @ x), distributed.total(xw.T @ (self.y - fixed)))
        self._beta = self.nuisance.poisson(intensity, self.counts, self.exposure, start=self._beta)
        return self._beta

    def value(self, model: torch.Tensor, pick=slice(None)) -> torch.Tensor:
        """This rank's loss of the model intensities `model` at its points `pick` (a scalar tensor)."""
        if self.loss == "chi2":
            return (self.w[pick] * (model - self.y[pick]) ** 2).sum()
        return poisson_deviance(self.counts[pick], self.exposure[pick] * torch.clamp(model, min=1e-300))

    def evaluate(self, theta: np.ndarray):
        """(loss, ∂loss/∂θ (n,), β) at θ, summed over chunks and ranks; raises UnstableError where the crystal is
        unstable."""
        fc = self.tds.force_constants
        set_theta(fc, theta)
        fc.theta.grad = None
        if len(self.chunks) == 1:  # one pass: the intensities keep their graph
            intensity = self._intensity()
            beta = self.profile(intensity.detach())
            value = self.value(self.nuisance.model(intensity, beta))
            value.backward()
        else:
            with torch.no_grad():
                intensity = torch.cat([self._intensity(chunk) for chunk in self.chunks])
            beta = self.profile(intensity)
            value = 0.0
            chunks = tqdm(self.chunks, desc="evaluation (chunks)", leave=False, disable=not self.progress)
            with self.tds.covariance_once():  # the covariance's backward once, not once per chunk
                for chunk in chunks:  # each chunk's graph is freed before the next is built
                    part = self.value(self.nuisance.model(self._intensity(chunk), beta, chunk), chunk)
                    part.backward()
                    value = value + part.detach()
        grad = distributed.total(fc.theta.grad.detach().cpu().numpy().copy())
        value = distributed.total(float(torch.as_tensor(value).detach()))
        if self.prior is not None:
            centre, width = self.prior
            value += float(np.sum(((theta - centre) / width) ** 2))
            grad += 2 * (theta - centre) / width**2
        return value, grad, beta.detach().cpu().numpy()

    @torch.no_grad()
    def jacobian(self, theta: np.ndarray, pick=None, central: bool = True) -> torch.Tensor:
        """∂I/∂θ (B, n_params) at θ by central differences (steps 1e-4·max(|θ_k|, 0.01) eV/Å²), or forward ones
        (half the evaluations, error O(step)), at the used points (or `pick` of them); the model is left at θ."""
        fc = self.tds.force_constants
        at = torch.as_tensor(np.asarray(theta, dtype=float), dtype=fc.theta.dtype, device=fc.theta.device)
        base, columns = at, []
        centre = None if central else self.intensity(at, pick)
        for k in range(len(at)):
            step = torch.zeros_like(at)
            step[k] = 1e-4 * max(abs(theta[k]), 1e-2)
            plus = base + step
            if central:
                minus = plus - 2 * step
                columns.append((self.intensity(plus, pick) - self.intensity(minus, pick)) / (2 * step[k]))
                base = minus + step  # θ + h − 2h + h: the point each column is taken about, as the steps left it
            else:
                columns.append((self.intensity(plus, pick) - centre) / step[k])
        set_theta(fc, at)
        return torch.stack(columns, dim=1)

    def whitening(self, theta: np.ndarray, n_points: int = 256) -> np.ndarray:
        """R (n, n) with RᵀR ≈ the Gauss–Newton matrix at θ on a subset of points: x = Rθ is well scaled.

        Directions the data barely see (a mirror-plane slice hides some) get at least 10⁻⁶ of the curvature of the
        best-determined one: with less, a unit step in x ran so far along them that the crystal became unstable and
        the first line search stalled. The preconditioning moves the path, not the minimum. The sampling model's
        finite differences use common random numbers (`fixed_noise`)."""
        chosen = np.linspace(0, self.n_total - 1, min(n_points, self.n_total)).astype(int)  # over all ranks' points
        mine = distributed.shard(self.n_total)
        pick = torch.as_tensor(chosen[(chosen >= mine[0]) & (chosen <= mine[-1])] - mine[0] if len(mine) else [],
                               dtype=torch.int64)
        normal = np.zeros((len(theta), len(theta)))
        if len(pick):
            with fixed_noise(self.tds):  # a preconditioner: forward differences are precise enough
                jac = self.jacobian(theta, pick, central=False) * torch.sqrt(self.w[pick])[:, None]
            normal = (jac.T @ jac).cpu().numpy()
        normal = distributed.total(normal)
        if self.prior is not None:  # the prior's curvature, on the subset's footing
            normal += len(chosen) / self.n_total / self.prior[1] ** 2 * np.eye(len(normal))
        normal += 1e-6 * np.linalg.eigvalsh(normal)[-1] * np.eye(len(normal))
        return np.linalg.cholesky(normal).T


def _exposure(data: TDSData, exposure, used, n_points: int) -> np.ndarray:
    """t (N_used,): counts per unit of intensity at the points `used` (indices), so that the counts are n = t·I_obs."""
    y = data.intensity[used]
    if np.any(y < 0):
        raise ValueError(f"loss='poisson' needs intensities ≥ 0 (counts/exposure); {int((y < 0).sum())} used points "
                         "are negative: use loss='chi2' for background-subtracted data")
    if exposure is not None:
        t = np.asarray(exposure, dtype=float)
        if t.ndim and t.shape != (n_points,):
            raise ValueError(f"exposure must be one number or one per point, shape ({n_points},); got {t.shape}")
        t = np.broadcast_to(t, (n_points,))[used]
        if not np.all(np.isfinite(t) & (t > 0)):
            raise ValueError("exposure (counts per unit of intensity) must be finite and > 0")
        return t
    if data.sigma is None:
        raise ValueError("loss='poisson' needs the counts: give exposure= (counts per unit of intensity, one number "
                         "or one per point) or data whose σ is the counting error √n/exposure")
    sigma = data.sigma[used]
    return np.where(y > 0, y / np.where(y > 0, sigma, 1.0) ** 2, 1.0 / sigma)
