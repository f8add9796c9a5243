"""Use a meta-trained checkpoint: adapt to a new task's support set, predict its queries.

Examples
--------
>>> from applications.meta_learning.learner import MetaLearner
>>> learner = MetaLearner.load("runs/quick/checkpoint.pt")          # doctest: +SKIP
>>> learner.adapt(x_support, y_support)     # [N*K, 1, 28, 28], [N*K]  # doctest: +SKIP
>>> labels = learner.predict(x_query)       # [N*Q] class indices      # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

from .algorithms import FunctionalModel, MetaObjective, task_type_of
from .checkpoint import CheckpointError, _first_line, load_checkpoint
from .inner_solvers import Params
from .trainer import TrainConfig, build_network

__all__ = ["MetaLearner"]

#: What to do about a checkpoint that cannot be loaded for evaluation / adaptation.
LOAD_ADVICE = ("Pass another checkpoint (the checkpoint.pt in a 'train' output directory), "
               "or re-create it by training again.")


class MetaLearner:
    """Meta-learned parameters plus the inner solver they were trained with.

    Parameters
    ----------
    config : TrainConfig
        The training configuration (model, algorithm, inner solver).
    theta : dict of tensors
        Meta-learned parameters.
    device : torch.device or str

    Examples
    --------
    >>> import torch
    >>> cfg = TrainConfig(task="sinusoid", algorithm="imaml", inner_solver="hf", inner_steps=5, inner_tol=1e-4)
    >>> net = build_network(cfg.resolved())
    >>> learner = MetaLearner(cfg, {k: v.detach() for k, v in net.named_parameters()})
    >>> x = torch.linspace(-5, 5, 10).unsqueeze(-1)
    >>> _ = learner.adapt(x, torch.sin(x))
    >>> learner.predict(x).shape
    torch.Size([10, 1])
    """

    def __init__(self, config: TrainConfig, theta: Params, *, device: torch.device | str = "cpu") -> None:
        self.config = config.resolved()
        self.device = torch.device(device)
        self.network = FunctionalModel(build_network(self.config).to(self.device))
        self.objective = MetaObjective(self.network, task_type_of(self.config.task), self.config.algorithm_config(),
                                       use_vmap=False)
        missing = set(self.objective.meta_parameters()) - set(theta)
        if missing:
            raise ValueError(f"parameters {sorted(missing)} missing for a {self.config.task} model")
        for k, v in self.objective.meta_parameters().items():
            if tuple(getattr(theta[k], "shape", ())) != tuple(v.shape):
                raise ValueError(f"parameter {k!r} has shape {tuple(getattr(theta[k], 'shape', ()))}, "
                                 f"a {self.config.task} model's is {tuple(v.shape)}")
        self.theta = {k: v.detach().to(self.device) for k, v in theta.items()}
        self.adapted: Params | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> MetaLearner:
        """Load a training checkpoint (``<output dir>/checkpoint.pt``).

        Raises :class:`~.checkpoint.CheckpointError` (naming the file) for a file that is
        unreadable, truncated or corrupt, not a checkpoint, or not a meta-training one.
        """
        state = load_checkpoint(path, required=("config", "theta"), what="meta-training checkpoint",
                                advice=LOAD_ADVICE)
        try:
            config = TrainConfig.from_dict(state["config"])
            return cls(config, state["theta"], device=device)
        except (TypeError, ValueError, RuntimeError) as err:  # unknown fields, missing / misshapen parameters
            raise CheckpointError(f"meta-training checkpoint {path} does not describe a usable model "
                                  f"({_first_line(err)}). {LOAD_ADVICE}") from err

    def _check_inputs(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
        if self.config.task == "omniglot" and (x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28)):
            raise ValueError(f"{what} must be images [n, 1, 28, 28], got {tuple(x.shape)}")
        if self.config.task == "sinusoid" and (x.dim() != 2 or x.shape[1] != 1):
            raise ValueError(f"{what} must be inputs [n, 1], got {tuple(x.shape)}")
        return x.to(self.device)

    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor) -> Params:
        """Run the inner solver from the meta-parameters on one support set; keep and return the result."""
        x_support = self._check_inputs(x_support, "x_support")
        y_support = y_support.to(self.device)
        if self.config.task == "omniglot":
            if y_support.dtype != torch.int64 or y_support.shape != x_support.shape[:1]:
                raise ValueError("y_support must be int64 labels [n] matching x_support")
            if int(y_support.min()) < 0 or int(y_support.max()) >= self.config.ways:
                raise ValueError(f"labels must lie in 0..{self.config.ways - 1} (a {self.config.ways}-way model)")
        elif y_support.shape != x_support.shape:
            raise ValueError(f"y_support must have the shape of x_support {tuple(x_support.shape)}")
        inner = self.objective.config.inner
        anchor = self.objective.task_anchor(self.theta, x_support, y_support)
        self.adapted = inner.solve(self.objective.loss_fn, anchor, anchor, self.objective.config.inner_lam,
                                   x_support, y_support)
        self.adapted = {k: v.detach() for k, v in self.adapted.items()}
        return self.adapted

    @torch.no_grad()
    def predict(self, x_query: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Class indices (Omniglot) or regression outputs (sinusoid) of the adapted model.

        Batch norm uses the statistics of ``x_query`` (as in training), so pass the query
        set as one batch.
        """
        params = params if params is not None else self.adapted
        if params is None:
            raise RuntimeError("call adapt(x_support, y_support) before predict (or pass params=)")
        out = self.network(params, self._check_inputs(x_query, "x_query"))
        return out.argmax(-1) if self.config.task == "omniglot" else out
