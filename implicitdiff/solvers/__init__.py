"""Matrix-free linear solvers behind one interface (:class:`LinearSolver`)."""

from .auto import Auto
from .base import LinearProblem, LinearSolver, RawSolution
from .bicgstab import BiCGSTAB
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG

__all__ = [
    "LinearSolver",
    "LinearProblem",
    "RawSolution",
    "CG",
    "MINRES",
    "GMRES",
    "BiCGSTAB",
    "NormalCG",
    "Neumann",
    "Direct",
    "Auto",
]
