"""implicitdiff: implicit differentiation for bilevel optimization in PyTorch.

Differentiate the solution of any inner solver (a Python loop, ``torch.optim``, L-BFGS,
scipy on numpy) through its optimality condition, with matrix-free linear solves.

Examples
--------
>>> import torch, implicitdiff as idiff
>>> @idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum() + (x ** 2).sum())
... def argmin(x, a):
...     return a / 2          # closed-form inner solver
>>> a = torch.tensor([1.0, 2.0], requires_grad=True)
>>> argmin(torch.zeros(2), a).sum().backward()
>>> a.grad
tensor([0.5000, 0.5000])
"""

from . import projections, prox
from ._version import __version__ as __version__
from .conditions import Condition, fixed_point_condition, proximal_condition, stationarity_condition
from .constrained import kkt_condition, projected_gradient_condition, proximal_gradient_condition
from .diagnostics import FailurePolicy, SolveInfo, SolveStatus, record_solves
from .distributed import DataParallel
from .errors import (
    ImplicitDiffError,
    InnerOptimalityWarning,
    LinearSolveError,
    LinearSolveWarning,
    NonFiniteError,
)
from .implicit_diff import ImplicitFunction, implicit_diff
from .inner_solvers import OptimizeResult, fista, projected_gradient
from .linear_solve import LinearSolution, linear_solve
from .minibatch import Minibatch
from .preconditioners import NystromPreconditioner
from .solvers import (
    CG,
    GMRES,
    MINRES,
    Auto,
    BiCGSTAB,
    Direct,
    LinearProblem,
    LinearSolver,
    Neumann,
    NormalCG,
    RawSolution,
)

__all__ = [
    "implicit_diff",
    "ImplicitFunction",
    "linear_solve",
    "LinearSolution",
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
    "NystromPreconditioner",
    "Condition",
    "stationarity_condition",
    "fixed_point_condition",
    "proximal_condition",
    "projected_gradient_condition",
    "proximal_gradient_condition",
    "kkt_condition",
    "Minibatch",
    "DataParallel",
    "projections",
    "prox",
    "projected_gradient",
    "fista",
    "OptimizeResult",
    "SolveInfo",
    "SolveStatus",
    "FailurePolicy",
    "record_solves",
    "ImplicitDiffError",
    "LinearSolveError",
    "NonFiniteError",
    "LinearSolveWarning",
    "InnerOptimalityWarning",
]
