"""The version of implicitdiff: the one place it is written.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``) and ``implicitdiff.__version__`` re-exports it.
"""

__version__ = "0.2.0.dev0"
