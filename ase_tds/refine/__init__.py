"""Refining a machine-learned potential's own weights against TDS (`refine`), with the potentials' protocol and table
(`potentials`), the forces → θ map (`projection`), the anchor to the pretrained potential (`anchor`) and what moved
(`drift`). docs/refine.md explains the choices."""

from .potentials import POTENTIALS, Potential, check_potential, load_potential
from .refine import RefineResult, refine

__all__ = ["POTENTIALS", "Potential", "RefineResult", "check_potential", "load_potential", "refine"]
