"""Hyperparameter tuning applications built on :mod:`implicitdiff`.

Run from the command line::

    python -m applications.hyperparameter_tuning regularization [--quick] [--out DIR]
    python -m applications.hyperparameter_tuning distillation   [--quick] [--out DIR]
    python -m applications.hyperparameter_tuning equilibrium    [--quick] [--out DIR]

Modules
-------
regularization
    One L2 penalty per feature of a logistic regression, tuned by hypergradient descent
    (L-BFGS inner solver + implicit differentiation), compared with scikit-learn's
    ``LogisticRegressionCV`` and with an unrolled inner loop.
distillation
    Dataset distillation on ``digits``: one learned synthetic image per class.
equilibrium
    An implicit layer ``z = tanh(W z + U x + b)`` trained through its fixed point, GMRES vs
    Neumann in the backward pass.
datasets, logistic_model, lbfgs, fixed_point_solvers, dense_reference, reporting
    The building blocks they share.
"""
