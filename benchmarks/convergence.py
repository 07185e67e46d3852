"""Convergence and cost of the all-order (gaussian) intensities at the default settings.

Accuracy: random points with |Q| ≤ 8 Å⁻¹, more than 0.1 r.l.u. from every Bragg peak, against the independent
converged reference of `tests/reference_tds.py` (the exact diffuse intensity of a periodic crystal of M³ primitive
cells at Q on its own reciprocal lattice, phonopy's eigen-solver and numpy; M = 32, whose 1/M lattice the default
grids do not share). Crystals: fcc Ni with the published Born–von Kármán constants (296 K), NaCl and Si with
phonopy's DFT force constants, hcp Ni with EMT. Rows: the default; ase_tds 0.1's default (converged Debye–Waller
factor with a 15³ grid's higher orders, sharp sum) and its 9³ variant; the default's own error estimate
(`discretisation_error`) against the true error. A cross-check of the reference by another route: ase_tds 0.1's
formulation at Q on the reference lattice, extrapolated in 1/L from L = 16, 24, 32 (Ni).

Cost: loss + gradient of 12 000 points (the fit's evaluation) at the default against ase_tds 0.1 at grid 9³
(converged Debye–Waller mesh 12, sharp sum), both in this run: Ni (5 shells, BvK) and NaCl (ForceConstantModel,
cutoff 5 Å, the DFT constants projected). Writes results/convergence.json and results/convergence.png.

    python benchmarks/convergence.py [--quick] [--points N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference_tds as ref  # noqa: E402
from _common import RESULTS, best_of, write_json  # noqa: E402

T = 296.0
DFT = Path(__file__).resolve().parents[1] / "tests" / "data" / "dft"


def crystals():
    """name → (phonopy object, Bragg cell for the 0.1 r.l.u. exclusion)."""
    import phonopy
    from ase.build import bulk
    from phonopy.structure.atoms import PhonopyAtoms

    from conftest import emt_phonopy

    out = {"Ni (BvK, 296 K)": (ref.birgeneau_ni_phonopy(), np.eye(3) * ref.NI_A)}
    for name in ("NaCl", "Si"):
        ph = phonopy.load(DFT / name / "phonopy_params.yaml", produce_fc=False, is_nac=False)
        out[f"{name} (DFT)"] = (ph, np.array(ph.unitcell.cell))
    hcp = bulk("Ni", "hcp", a=2.49, c=4.07)
    cell = PhonopyAtoms(symbols=hcp.get_chemical_symbols(), cell=hcp.cell[:], scaled_positions=hcp.get_scaled_positions())
    out["hcp Ni (EMT)"] = (emt_phonopy(cell, np.diag([4, 4, 3]), np.eye(3)), None)
    return out


def old_intensity(source, q, grid=(9, 9, 9), dw_mesh: int = 12):
    """ase_tds 0.1's gaussian model: converged Debye–Waller (meshes m³, (2m)³ extrapolated) with the grid's higher
    orders summed sharply over one period, chunked as it was."""
    from ase_tds.chunks import map_chunks, matrix_chunk
    from ase_tds.covariance import ThermalCovariance
    from ase_tds.scattering import FormFactors, debye_waller_exponent, multi_phonon_intensity, one_phonon_intensity

    q = torch.as_tensor(q, dtype=torch.float64)
    covariance = ThermalCovariance(source, T, "quantum")
    msd = covariance.converged_mean_square_displacement(dw_mesh)
    separations, correlation = covariance.real_space(grid)
    form = FormFactors(source.primitive.get_chemical_symbols())
    amp = form(torch.linalg.norm(q, dim=-1)) * torch.exp(-debye_waller_exponent(q, msd))
    n = source.n_atoms
    chunk = int(min(matrix_chunk(n), max(2**22 // (np.prod(grid) * n * n), 16)))

    def intensity(qc, a):
        return one_phonon_intensity(covariance, qc, a) + multi_phonon_intensity(qc, a, separations, correlation)

    return torch.cat(map_chunks(intensity, (q, amp), chunk))


def accuracy(points: int, mesh: int) -> dict:
    from ase_tds import PhonopyForceConstants, tds_model

    out = {}
    for name, (ph, bragg) in crystals().items():
        cell = np.array(ph.primitive.cell)
        recip = np.linalg.norm(2 * np.pi * np.linalg.inv(cell), axis=0)
        grid = tuple(int(round(mesh * r / recip.max())) for r in recip)
        q = ref.commensurate_points(cell, grid, points, 8.0, np.random.default_rng(11), bragg_cell=bragg)
        truth = ref.periodic_crystal_intensity(ph, q, grid, T)
        source = PhonopyForceConstants(ph)
        tds = tds_model(source, T, method="gaussian", statistics="quantum")
        with torch.no_grad():
            rows = {"default": tds(q).numpy(), "ase_tds 0.1 default (grid 15³)": old_intensity(source, q, (15,) * 3),
                    "ase_tds 0.1, grid 9³": old_intensity(source, q).numpy()}
            estimate = tds.discretisation_error(q).numpy()
        rows["ase_tds 0.1 default (grid 15³)"] = rows["ase_tds 0.1 default (grid 15³)"].numpy()
        result = {"reference_mesh": list(grid), "points": len(q), "default_grid": list(tds.grid),
                  "near_bragg_grids": tds.settings()["near_bragg_grids"]}
        for label, values in rows.items():
            err = values / truth - 1
            result[label] = {"median": float(np.median(np.abs(err))), "p90": float(np.percentile(np.abs(err), 90)),
                             "worst": float(np.abs(err).max()), "signed_median": float(np.median(err))}
        err = np.abs(rows["default"] / truth - 1)
        result["estimate_covers"] = float(np.mean(err <= 2 * estimate / truth + 1e-4))
        result["q_norm"], result["error"] = np.linalg.norm(q, axis=1).tolist(), err.tolist()
        out[name] = result
        print(f"{name}: default {tds.grid}: median {result['default']['median']:.1e}, worst "
              f"{result['default']['worst']:.1e}; 0.1 default {result['ase_tds 0.1 default (grid 15³)']['signed_median']:+.2%}"
              f" (median), 0.1 at 9³ {result['ase_tds 0.1, grid 9³']['signed_median']:+.2%}; estimate covers "
              f"{result['estimate_covers']:.0%}", flush=True)
    return out


def cross_check(points: int) -> dict:
    """The reference by another route: ase_tds 0.1's formulation (converged W) at Q on the 1/32 lattice for
    L = 16, 24 (where commensurate) and 32, fitted with I∞ − c/L − d/L² (Ni)."""
    from ase_tds import PhonopyForceConstants

    ph = ref.birgeneau_ni_phonopy()
    cell = np.array(ph.primitive.cell)
    q = ref.commensurate_points(cell, (48,) * 3, points, 8.0, np.random.default_rng(5), bragg_cell=np.eye(3) * ref.NI_A)
    truth = ref.periodic_crystal_intensity(ph, q, (48,) * 3, T)
    source = PhonopyForceConstants(ph)
    sizes = (16, 24, 48)
    with torch.no_grad():
        values = np.array([old_intensity(source, q, (L,) * 3).numpy() for L in sizes])
    design = np.array([[1, 1 / L, 1 / L**2] for L in sizes])
    limit = np.linalg.solve(design, values)[0]
    err = np.abs(limit / truth - 1)
    print(f"cross-check (Ni): 1/L extrapolation of the converged-W formulation vs the reference: median "
          f"{np.median(err):.1e}, worst {err.max():.1e}")
    return {"points": len(q), "grids": list(sizes), "median": float(np.median(err)), "worst": float(err.max())}


def cost(points: int) -> dict:
    from ase.build import bulk

    from ase_tds import ForceConstantModel, PhonopyForceConstants, tds_model

    out = {}
    ni = ForceConstantModel(bulk("Ni", "fcc", a=ref.NI_A, cubic=True), shells=5)
    ni.set_from_phonopy(ref.birgeneau_ni_phonopy())
    nacl = ForceConstantModel(PhonopyForceConstants(DFT / "NaCl" / "phonopy_params.yaml").unitcell, cutoff=5.0)
    nacl.set_from_phonopy(DFT / "NaCl" / "phonopy_params.yaml")
    for name, model in (("Ni (BvK, 5 shells)", ni), ("NaCl (cutoff 5 Å, 8 parameters)", nacl)):
        rng = np.random.default_rng(1)
        q = rng.normal(size=(4 * points, 3))
        q *= (8.0 * rng.uniform(0.05, 1, len(q)) ** (1 / 3) / np.linalg.norm(q, axis=1))[:, None]
        from ase_tds.forward.grid import bragg_distance

        q = q[bragg_distance(model.primitive, torch.as_tensor(q)).numpy() > 0.15][:points]
        tds = tds_model(model, T, method="gaussian", statistics="quantum")

        def new():
            model.theta.grad = None
            tds(q).sum().backward()

        def old():
            model.theta.grad = None
            old_intensity(model, q).sum().backward()

        new(), old()
        t_new, t_old = best_of(new, 3), best_of(old, 3)
        levels = tds.levels(torch.as_tensor(q)).numpy()
        out[name] = {"points": len(q), "grid": list(tds.grid), "level_share": np.bincount(levels, minlength=3).tolist(),
                     "default_s": t_new, "old_9_s": t_old, "ratio": t_new / t_old}
        print(f"{name}: loss + gradient, {len(q)} points: default {t_new:.2f} s, ase_tds 0.1 grid 9³ {t_old:.2f} s: "
              f"{t_new / t_old:.2f}×", flush=True)
    return out


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.semilogy(r["q_norm"], np.maximum(r["error"], 1e-8), ".", ms=3, label=f"{name}, grid {r['default_grid']}")
    ax.axhline(1e-3, color="k", lw=0.8, ls="--")
    ax.axhline(3e-3, color="k", lw=0.8, ls=":")
    ax.set_xlabel("|Q| (Å⁻¹)")
    ax.set_ylabel("|I / I_converged − 1|")
    ax.set_title("gaussian model at its defaults against the converged reference")
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "convergence.png", dpi=120)
    print(f"wrote {RESULTS / 'convergence.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--points", type=int, default=2000, help="accuracy points per crystal")
    args = parser.parse_args()
    points = 300 if args.quick else args.points
    acc = accuracy(points, 32)
    plot(acc)
    check = cross_check(150 if args.quick else 600)
    speed = cost(3000 if args.quick else 12000)
    for r in acc.values():
        del r["q_norm"], r["error"]
    write_json("convergence_quick.json" if args.quick else "convergence.json",
               {"temperature": T, "accuracy": acc, "reference_cross_check": check, "cost": speed})


if __name__ == "__main__":
    main()
