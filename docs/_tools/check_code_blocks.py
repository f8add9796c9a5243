"""Check the code shown by the documentation: every Python block is executed, no line is cut off.

* Python in ``docs/*.rst`` must be in ``testcode``/``doctest`` blocks, which
  ``python -m sphinx -b doctest docs ...`` runs: a ``code-block:: python`` (or ``pycon``), a
  ``>>>`` prompt outside a doctest block, is reported (it would never be run).
* No line of a code block (any language, literal ``::`` blocks included) or of an example
  script in ``examples/`` is longer than ``--max`` characters (default 90): furo's code box
  shows about that many before the line is cut off behind a scrollbar.

Usage: ``python docs/_tools/check_code_blocks.py [--max 90]``; exits 1 listing every problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

EXECUTED = {"testcode", "doctest", "testoutput", "testsetup", "testcleanup"}
PYTHON = {"python", "py", "python3", "pycon", "ipython"}
DIRECTIVE = re.compile(
    r"^(\s*)\.\. (code-block|code|sourcecode|testcode|doctest|testoutput|testsetup|"
    r"testcleanup)::\s*(\S*)"
)


def blocks(text: str):
    """Yield ``(kind, language, first_line_number, lines)`` for every code block of an rst text."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = DIRECTIVE.match(line)
        literal = (
            line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        ) and m is None
        if m or literal:
            indent = len(m.group(1)) if m else len(line) - len(line.lstrip())
            kind = m.group(2) if m else "literal"
            language = (m.group(3) if m else "").lower()
            j = i + 1
            while j < len(lines) and (
                not lines[j].strip()
                or (lines[j].lstrip().startswith(":")
                and len(lines[j]) - len(lines[j].lstrip()) > indent)
            ):
                j += 1  # blank lines and directive options
            body, start = [], j
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
            ):
                body.append(lines[j])
                j += 1
            yield kind, language, start + 1, body
            i = j
        else:
            i += 1


def check(max_len: int) -> list[str]:
    problems = []
    for path in sorted(DOCS.glob("*.rst")):
        rel = path.relative_to(ROOT)
        for kind, language, first, body in blocks(path.read_text()):
            if kind not in EXECUTED and (
                language in PYTHON or any(b.lstrip().startswith(">>>") for b in body)
            ):
                problems.append(
                    f"{rel}:{first}: Python in a '{kind}' block is never run: use testcode/doctest"
                )
            for k, b in enumerate(body):
                if len(b.rstrip()) - _indent(body) > max_len:
                    problems.append(
                        f"{rel}:{first + k}: code line of {len(b.rstrip()) - _indent(body)} "
                        f"characters (max {max_len})"
                    )
    for path in sorted(EXAMPLES.rglob("*.py")):
        rel = path.relative_to(ROOT)
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if len(line) > max_len:
                problems.append(
                    f"{rel}:{k}: line of {len(line)} characters (max {max_len})"
                )
    return problems


def _indent(body: list[str]) -> int:
    widths = [len(b) - len(b.lstrip()) for b in body if b.strip()]
    return min(widths) if widths else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max", type=int, default=90, help="longest code line allowed (characters)"
    )
    args = parser.parse_args(argv)
    problems = check(args.max)
    for p in problems:
        print(p)
    print(
        f"{len(problems)} problem(s) in the documentation's code blocks"
        if problems
        else "documentation code blocks: all Python is executed, no line is too long"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
