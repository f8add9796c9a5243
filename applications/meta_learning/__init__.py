"""Meta-learning with implicit gradients (iMAML) on implicitdiff, with MAML / first-order MAML baselines.

Modules: :mod:`.inner_solvers` (GD, Newton-CG), :mod:`.algorithms` (the meta-objective),
:mod:`.trainer` (training loop, checkpoints), :mod:`.evaluation`, :mod:`.lake` (the Lake et al.
one-shot runs), :mod:`.learner`
(:class:`MetaLearner`: load, adapt, predict), :mod:`.comparison`, :mod:`.distributed`,
:mod:`.presets`, :mod:`.cli`; data, models, augmentation and the supervised baseline in :mod:`.data`,
:mod:`.models`, :mod:`.augmentation`, :mod:`.baseline`.

Examples
--------
>>> from applications.meta_learning import MetaLearner, TrainConfig
>>> TrainConfig(task="omniglot", ways=5).resolved().inner_steps
16
"""

from .learner import MetaLearner
from .trainer import MetaTrainer, TrainConfig

__all__ = ["MetaLearner", "MetaTrainer", "TrainConfig"]
