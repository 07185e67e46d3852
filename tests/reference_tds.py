"""An independent, converged reference for the all-order TDS (numpy and phonopy only; no ase_tds kernel).

The exact diffuse intensity of a periodic crystal of M1×M2×M3 primitive cells at Q on its own reciprocal lattice:

    I(Q) = (1/n) Σ_κκ' f_κ f_κ' e^{−W_κ−W_κ'} Σ_l cos(Q·d) [exp(Q·C_{κ0,κ'l}·Q) − 1],   d = r_κ'l − r_κ0,

summed over one period of l, with C and W from the crystal's own q mesh: phonopy's eigen-solver at every q of the
Γ-centred mesh (no symmetry), C̃(q) = Σ_ν h(ω_ν) e_ν e_ν†/√(m_κ m_κ') with h = ħ coth(ħω/2k_BT)/2ω (quantum) or
k_BT/ω² (classical), the three translations at Γ dropped, and C_{κ0,κ'l} = (1/N) Σ_q C̃(q) e^{−iq·d} by numpy's FFT.
As M grows this tends to the infinite crystal, fast (reference_convergence shows it); it shares with ase_tds only
the force constants and xraydb's f₀ table. Also: Born–von Kármán force constants of fcc nickel as published
(Birgeneau et al., Phys. Rev. 136, A1359 (1964), 296 K, axially symmetric fit) built into phonopy directly.
"""

from __future__ import annotations

import itertools

import numpy as np
import xraydb
from ase import units
from ase.build import bulk

# Birgeneau, Cordes, Dolling & Woods (1964), Ni at 296 K, N/m: the BvK constants of the canonical neighbour of
# each shell (110), (200), (211), (220), (310) in units of a/2, as transcribed in danse-inelastic/vnf
BIRGENEAU_NI_296 = {
    (1, 1, 0): {"xx": 17.720, "zz": -1.015, "xy": 18.735},
    (2, 0, 0): {"xx": 1.148, "yy": -0.998},
    (2, 1, 1): {"xx": 0.940, "yy": 0.182, "yz": 0.505, "xz": 0.253},
    (2, 2, 0): {"xx": 0.459, "zz": -0.153, "xy": 0.612},
    (3, 1, 0): {"xx": -0.363, "yy": 0.100, "zz": 0.158, "xy": -0.174},
}
N_PER_M_IN_EV_PER_A2 = 1.0 / (units._e * 1e20)  # 1 N/m in eV/Å²
NI_A = 3.52


def canonical_block(vector, constants) -> np.ndarray:
    """The 3×3 BvK block φ (N/m) of the canonical neighbour `vector`, from the table's named elements; the
    elements a table leaves out follow from the neighbour's own symmetry (axially symmetric forms)."""
    h, k, l = vector
    c = constants
    if (h, k, l) == (1, 1, 0) or (h, k, l) == (2, 2, 0):
        return np.array([[c["xx"], c["xy"], 0], [c["xy"], c["xx"], 0], [0, 0, c["zz"]]])
    if (h, k, l) == (2, 0, 0):
        return np.diag([c["xx"], c["yy"], c["yy"]])
    if (h, k, l) == (2, 1, 1):
        return np.array([[c["xx"], c["xz"], c["xz"]], [c["xz"], c["yy"], c["yz"]], [c["xz"], c["yz"], c["yy"]]])
    if (h, k, l) == (3, 1, 0):
        return np.array([[c["xx"], c["xy"], 0], [c["xy"], c["yy"], 0], [0, 0, c["zz"]]])
    raise ValueError(f"no canonical form for {vector}")


def cubic_rotations() -> list[np.ndarray]:
    """The 48 signed permutation matrices (point group m-3m)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            r = np.zeros((3, 3))
            r[range(3), perm] = signs
            out.append(r)
    return out


def birgeneau_ni_phonopy(supercell: int = 6):
    """phonopy.Phonopy of fcc Ni (primitive cell, a = 3.52 Å) with the published 296 K BvK force constants:
    Φ(0; R) = −R φ_canonical Rᵀ for every image R of each canonical neighbour under m-3m, the on-site block from
    the acoustic sum rule. `supercell`: repetitions of the primitive cell (6: half its shortest translation, 7.5 Å, holds the
    5th shell at 5.6 Å without ambiguous images)."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    prim = bulk("Ni", "fcc", a=NI_A)
    ph = Phonopy(PhonopyAtoms(symbols=["Ni"], cell=np.array(prim.cell[:]), scaled_positions=[[0, 0, 0]]),
                 supercell_matrix=np.eye(3, dtype=int) * supercell, primitive_matrix=np.eye(3))
    pairs = {}
    for vector, constants in BIRGENEAU_NI_296.items():
        block = canonical_block(vector, constants) * N_PER_M_IN_EV_PER_A2
        for r in cubic_rotations():
            image = tuple(np.round(r @ np.array(vector)).astype(int))
            pairs[image] = -(r @ block @ r.T)
    sc = ph.supercell
    frac = sc.scaled_positions
    cell = np.array(sc.cell)
    fc = np.zeros((len(sc), len(sc), 3, 3))
    for i in range(len(sc)):
        d = frac - frac[i]
        d -= np.round(d)
        vec = np.round(d @ cell / (NI_A / 2)).astype(int)
        for j in range(len(sc)):
            block = pairs.get(tuple(vec[j]))
            if block is not None:
                fc[i, j] = block
        fc[i, i] = -fc[i].sum(axis=0)
    ph.force_constants = fc
    return ph


def _mode_weight(freq_thz: np.ndarray, temperature: float, statistics: str) -> np.ndarray:
    """h(ω) in Å²·amu for frequencies in THz: ħ coth(ħω/2k_BT)/2ω or k_BT/ω²."""
    omega = 2 * np.pi * freq_thz * 1e12  # rad/s
    amu, hbar = units._amu, units._hbar
    if statistics == "classical":
        return units._k * temperature / (amu * omega**2) * 1e20
    x = hbar * omega / (2 * units._k * temperature)
    return hbar / (2 * amu * omega) / np.tanh(x) * 1e20


# Γ of a polar crystal: the non-analytic term depends on the direction of approach. A mesh's Γ point stands for the
# cell around it: average the covariance over directions (Lebedev's 26-point rule, folded to 13 by q → −q).
LEBEDEV_13 = (np.vstack([np.eye(3), np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1]])
                         / np.sqrt(2), np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]) / np.sqrt(3)]),
              np.concatenate([np.full(3, 2 / 21), np.full(6, 8 / 105), np.full(4, 9 / 140)]))


def _modes(ph, qpts, direction=None):
    """(frequencies (N, 3n) THz, eigenvectors (N, 3n, 3n)) from phonopy's eigen-solver at reduced qpts (N, 3)."""
    ph.run_qpoints(qpts, with_eigenvectors=True, nac_q_direction=direction)
    return ph.qpoints.frequencies, ph.qpoints.eigenvectors


def _mode_covariance(ph, qpts, temperature: float, statistics: str, direction=None) -> np.ndarray:
    """M^{1/2}C̃M^{1/2} (N, 3n, 3n) at reduced qpts, phonopy's phases; the three translations at Γ dropped."""
    freqs, vecs = _modes(ph, qpts, direction)
    n3 = freqs.shape[1]
    gamma = np.all(np.abs(qpts - np.round(qpts)) < 1e-12, axis=1)
    weight = np.zeros_like(freqs)
    ok = freqs > 1e-6
    weight[ok] = _mode_weight(freqs[ok], temperature, statistics)
    weight[gamma, :3] = 0.0
    if np.any(~ok & ~(gamma[:, None] & (np.arange(n3) < 3)[None])):
        raise ValueError("imaginary or zero modes away from Γ: the force constants are not stable")
    return np.einsum("qv,qiv,qjv->qij", weight, vecs, vecs.conj())


def mesh_covariance(ph, mesh, temperature: float, statistics: str = "quantum"):
    """(reduced q (N, 3) of the Γ-centred mesh, M^{1/2}C̃M^{1/2} (N, 3n, 3n) in the cell-origin convention).

    With phonopy's dipole correction (`nac_params`), whose sum is valid only in the first Brillouin zone: each q is
    evaluated at its first-zone image q₀ (phonopy's `BrillouinZone`), where the cell-origin covariance is the same
    (periodic in q); at Γ it is the average over the directions of approach (LEBEDEV_13).
    """
    from phonopy.structure.brillouin_zone import BrillouinZone

    mesh = np.array(mesh, dtype=int)
    grid = np.stack(np.meshgrid(*[np.arange(m) for m in mesh], indexing="ij"), -1).reshape(-1, 3)
    qpts = grid / mesh
    prim = ph.primitive
    if ph.nac_params is not None:
        zone = BrillouinZone(np.linalg.inv(prim.cell))
        zone.run(qpts)
        inner = np.array([points[0] for points in zone.shortest_qpoints])
    else:
        inner = qpts
    gamma = np.all(np.abs(qpts - np.round(qpts)) < 1e-12, axis=1)
    cov = _mode_covariance(ph, inner, temperature, statistics)
    if ph.nac_params is not None and gamma.any():
        cart = prim.cell  # a Cartesian direction d in reduced reciprocal coordinates: d·A / 2π ∝ A d
        cov[gamma] = sum(w * _mode_covariance(ph, inner[gamma], temperature, statistics, np.asarray(cart) @ d)
                         for d, w in zip(*LEBEDEV_13))
    # to the cell-origin convention: × e^{−iq₀·(r_κ' − r_κ)} (periodic in q)
    phase = np.repeat(np.exp(-2j * np.pi * (inner @ prim.scaled_positions.T)), 3, axis=1)  # (N, 3n)
    return qpts, cov * phase.conj()[:, :, None] * phase[:, None, :]


def real_space_correlation(ph, mesh, temperature: float, statistics: str = "quantum"):
    """(lattice (G, 3) int in [0, M), C (G, n, n, 3, 3) Å²: C_{κ0,κ'l} of the periodic crystal `mesh`)."""
    mesh = np.array(mesh, dtype=int)
    qpts, cov = mesh_covariance(ph, mesh, temperature, statistics)
    prim = ph.primitive
    n = len(prim)
    masses = np.asarray(prim.masses)
    inv_sqrt_m = np.repeat(1 / np.sqrt(masses), 3)
    cov = (cov * inv_sqrt_m[None, :, None] * inv_sqrt_m[None, None, :]).reshape(-1, n, 3, n, 3)
    # phonopy orders its mesh with the first index fastest; put it on the (m1, m2, m3) grid
    index = np.round(qpts * mesh).astype(int) % mesh
    grid = np.zeros(tuple(mesh) + (n, 3, n, 3), dtype=complex)
    grid[index[:, 0], index[:, 1], index[:, 2]] = cov
    corr = np.fft.fftn(grid, axes=(0, 1, 2)).real / np.prod(mesh)  # Σ_q C̃ e^{−2πi q·l}
    lattice = np.stack(np.meshgrid(*[np.arange(m) for m in mesh], indexing="ij"), -1).reshape(-1, 3)
    return lattice, corr.reshape(-1, n, 3, n, 3).transpose(0, 1, 3, 2, 4)


def periodic_crystal_intensity(ph, q, mesh, temperature: float, statistics: str = "quantum",
                               chunk: int = 2**22) -> np.ndarray:
    """I(Q) (N,) e.u./atom of the periodic crystal `mesh` at Cartesian q (N, 3) Å⁻¹ on its reciprocal lattice
    (refused otherwise), Bragg term removed: see the module docstring."""
    q = np.asarray(q, dtype=float).reshape(-1, 3)
    prim = ph.primitive
    cell = np.array(prim.cell)
    mesh = np.array(mesh, dtype=int)
    reduced = q @ cell.T / (2 * np.pi) * mesh
    if np.abs(reduced - np.round(reduced)).max() > 1e-6:
        raise ValueError("Q must lie on the reciprocal lattice of the periodic crystal (hkl·M integer)")
    lattice, corr = real_space_correlation(ph, mesh, temperature, statistics)
    n = len(prim)
    symbols = list(prim.symbols)
    pos = prim.positions
    sep = (lattice @ cell)[:, None, None, :] + pos[None, None, :, :] - pos[None, :, None, :]  # (G, n, n, 3)
    self_cov = np.stack([corr[0, k, k] for k in range(n)])
    out = np.zeros(len(q))
    step = max(1, chunk // (len(lattice) * n * n))
    for start in range(0, len(q), step):
        qb = q[start:start + step]
        qn = np.linalg.norm(qb, axis=1)
        f = np.stack([xraydb.f0(s, qn / (4 * np.pi)) for s in symbols], axis=1)  # (B, n)
        w = 0.5 * np.einsum("ba,kac,bc->bk", qb, self_cov, qb)
        amp = f * np.exp(-w)
        x = np.einsum("ba,gklac,bc->bgkl", qb, corr, qb)
        phase = np.cos(np.einsum("ba,gkla->bgkl", qb, sep))
        terms = (phase * np.expm1(x)).sum(axis=1)  # (B, n, n)
        out[start:start + step] = np.einsum("bk,bkl,bl->b", amp, terms, amp) / n
    return out


def commensurate_points(cell, mesh, count: int, q_max: float, rng, bragg_cell=None, bragg_radius: float = 0.1,
                        q_min: float = 0.5) -> np.ndarray:
    """Cartesian Q (count, 3) on the reciprocal lattice of the periodic crystal `mesh` of `cell` (the primitive cell,
    (3, 3) Å), uniform in q_min ≤ |Q| ≤ q_max, more than `bragg_radius` r.l.u. of `bragg_cell` (Euclidean in hkl;
    default `cell`) from every reciprocal-lattice vector of `cell`."""
    cell = np.asarray(cell, dtype=float)
    mesh = np.array(mesh)
    bragg_cell = cell if bragg_cell is None else np.asarray(bragg_cell, dtype=float)
    recip = 2 * np.pi * np.linalg.inv(cell).T
    lattice = bragg_cell @ np.linalg.inv(cell)  # hkl of the primitive G = m: m @ lattice.T
    out = np.zeros((0, 3))
    while len(out) < count:
        x = rng.normal(size=(8 * count, 3))
        x *= (q_max * rng.uniform((q_min / q_max) ** 3, 1.0, size=len(x)) ** (1 / 3)
              / np.linalg.norm(x, axis=1))[:, None]
        k = np.round(x @ cell.T / (2 * np.pi) * mesh) / mesh  # snap to the mesh
        qs = k @ recip
        hkl = qs @ bragg_cell.T / (2 * np.pi)
        near = np.round(hkl @ np.linalg.inv(lattice.T))
        offsets = np.array(list(itertools.product([-1, 0, 1], repeat=3)))
        g = (near[:, None, :] + offsets[None]) @ lattice.T
        far = np.linalg.norm(g - hkl[:, None, :], axis=2).min(axis=1) > bragg_radius
        keep = far & (np.linalg.norm(qs, axis=1) <= q_max) & (np.linalg.norm(qs, axis=1) >= q_min)
        out = np.concatenate([out, qs[keep]])
    return out[:count]
