"""Sphinx configuration for implicitdiff.

Builds (run from the repository root):

* HTML: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``; it executes the
  examples gallery (``examples/``) and is nitpicky (every cross-reference must resolve);
* every code block of the pages, run and checked against its printed output:
  ``python -m sphinx -W --keep-going -b doctest -D plot_gallery=0 docs docs/_build/doctest``
  (the ``>>>`` examples of the docstrings are run by pytest's ``--doctest-modules``);
* ``python docs/_tools/check_offline.py docs/_build/html``: no page loads anything from
  outside the site (math is rendered by a vendored copy of MathJax 3, ``_static/mathjax``);
* ``python docs/_tools/check_code_blocks.py``: no Python block is left unexecuted, no code
  line is too long for the page.
"""

import doctest
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("."))  # _tools.gallery
os.environ.setdefault("MPLBACKEND", "Agg")

project = "implicitdiff"
author = "implicitdiff developers"
copyright = "2026, implicitdiff developers"
import implicitdiff._version  # noqa: E402

release = implicitdiff._version.__version__  # one source of truth

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "sphinx_gallery.gen_gallery",
]
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# types of the parameters a docstring documents only: private dataclass fields such as
# LinearProblem's ``_rmatvec`` stay out of the page
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
suppress_warnings = ["autodoc.import_object"]
exclude_patterns = ["_build", "_tools", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.codeobj.json"]

# ---------------------------------------------------------------- cross-references
# Nitpicky: every cross-reference must resolve (with -W, a broken one fails the build). No
# intersphinx (the documentation builds offline), so names from torch, optree and the
# standard library cannot be resolved: they are listed here.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"torch(\..*)?"),
    ("py:.*", r"optree(\..*)?"),
    ("py:.*", r"numpy(\..*)?|np\..*"),
    ("py:.*", r"(os|pathlib|abc|enum|typing|collections|dataclasses|argparse)\..*"),
    ("py:class", r"(callable|optional|pytree|tensor|tensors|Tensor|Module|Path|PathLike|path)"),
    ("py:class", r"(int|float|str|bool|dict|list|tuple|None|sequence|iterable|mapping|any)"),
    # the value part of "dict of str to torch.Tensor"
    ("py:class", r"str to .*"),
    # NumPy-style choices in type fields, e.g. ``on_failure : {"warn", "raise", "ignore"}``
    ("py:class", r'\{?"[^"]*"\}?'),
    # implicitdiff.implicit_diff.Mode: the private alias Literal["implicit", "unrolled", "one_step"]
    # of the ``mode`` argument, whose values the docstring lists
    ("py:class", r"Mode"),
]
nitpick_ignore = [
    ("py:exc", "FileNotFoundError"),
    ("py:exc", "ValueError"),
    ("py:exc", "TypeError"),
    ("py:class", "FileNotFoundError"),
    ("py:class", "ValueError"),
]



def _resolve_short_names(app, env, node, contnode):
    """Resolve an unqualified reference (``:class:`AlgorithmConfig``` in a docstring of another
    module) to the one object of this project documented under that name, if there is one.

    Sphinx looks a name up in the current module and class only; docstrings of the
    applications refer to their siblings by their short names. Only objects of
    ``implicitdiff`` and ``applications`` are considered, and only a unique match.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    if not target or target.startswith(("implicitdiff.", "applications.", "torch")):
        return None
    domain = env.get_domain("py")
    suffix = "." + target
    matches = [name for name in domain.objects
               if name.endswith(suffix) and name.startswith(("implicitdiff.", "applications."))]
    if len(matches) != 1:
        return None
    return domain.resolve_xref(env, node.get("refdoc"), app.builder, node.get("reftype"), matches[0],
                               node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_short_names)


# ---------------------------------------------------------------- doctest
# Blocks share one namespace per page (the default group); each page starts afresh.
doctest_global_setup = """
import os
os.environ.setdefault("MPLBACKEND", "Agg")
try:  # the Omniglot blocks of meta_learning_data.rst need the bundled data
    from applications.meta_learning.data import resolve_omniglot_root
    omniglot_available = resolve_omniglot_root() is not None
except Exception:
    omniglot_available = False
"""
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
# Only the explicit ``doctest``/``testcode`` blocks of the pages. The ``>>>`` examples of the
# docstrings shown by autodoc are run by pytest (``--doctest-modules``), in their modules'
# namespaces; here they would miss the module's imports.
doctest_test_doctest_blocks = ""

# ---------------------------------------------------------------- math, offline
# MathJax 3.2.2 (npm ``mathjax@3``: es5/tex-chtml-full.js and its woff-v2 fonts, Apache-2.0)
# is shipped in _static/mathjax: the pages render their math without a network.
mathjax_path = "mathjax/tex-chtml-full.js"

# ---------------------------------------------------------------- examples gallery


sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    # the constrained-problems section is filled by its own examples as they are added
    "subsection_order": [
        "../examples/hypergradients",
        "../examples/layers_and_meta_learning",
        "../examples/solvers",
        "../examples/constrained",
    ],
    "within_subsection_order": "FileNameSortKey",
    "reset_modules": ("matplotlib", "_tools.gallery.reset_torch"),
    "min_reported_time": 0,
    # the per-example run time is printed at the bottom of every example; the summary pages
    # (sg_execution_times) would load jQuery and DataTables from a CDN
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_signature": False,
    "image_srcset": [],
    "matplotlib_animations": False,
    "capture_repr": (),
}

# ---------------------------------------------------------------- HTML
html_theme = "furo"
html_title = "implicitdiff"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
