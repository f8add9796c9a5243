"""Check that the built HTML documentation works offline: no page loads anything from outside.

Every ``.html`` page of the build is scanned for resources it would fetch — ``<script src>``,
``<link href>`` (stylesheets, preloads, icons), ``<img src>``/``srcset``, ``<iframe>``,
``<source>``, ``<embed>``, ``<object>`` and ``url(...)`` in inline styles — and so is every
stylesheet of the site for ``@import``/``url(...)``. Any of them with a scheme or a
protocol-relative ``//`` address is reported (plain links, ``<a href>``, are not fetched and
are allowed). Pages with math must load the bundled MathJax.

With ``--browser`` (needs Chromium), the pages with math are also opened in headless Chromium
with every host name made unresolvable, and each must end up with typeset math
(``mjx-container`` elements) and no raw ``\\(`` or ``\\[`` delimiters left.

Usage: ``python docs/_tools/check_offline.py [BUILD_DIR] [--browser]`` (default
``docs/_build/html``); exits 1 listing every problem.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

FETCHED = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "source": ("src", "srcset"),
    "embed": ("src",),
    "object": ("data",),
    "audio": ("src",),
    "video": ("src", "poster"),
    "track": ("src",),
}
LINK_FETCHED = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "shortcut", "apple-touch-icon",
                "manifest", "dns-prefetch", "preconnect"}
EXTERNAL = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
CSS_URL = re.compile(r"""(?:@import\s+(?:url\()?|url\()\s*['"]?([^'")\s]+)""")
MATH_MARKERS = ('class="math', "\\(", "\\[")


def external(url: str) -> bool:
    url = url.strip()
    return bool(EXTERNAL.match(url)) and not url.startswith(("data:", "#", "javascript:", "about:"))


class Resources(HTMLParser):
    """Collects the addresses a page fetches when it is displayed."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[tuple[str, str]] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "link":
            rel = set(a.get("rel", "").lower().split())
            if rel & LINK_FETCHED and a.get("href"):
                self.fetched.append((f"<link rel={a['rel']}>", a["href"]))
        for attr in FETCHED.get(tag, ()):
            for url in _srcset(a.get(attr, "")) if attr == "srcset" else [a.get(attr, "")]:
                if url:
                    self.fetched.append((f"<{tag} {attr}>", url))
        for url in CSS_URL.findall(a.get("style", "")):
            self.fetched.append((f"<{tag} style>", url))


def _srcset(value: str) -> list[str]:
    return [part.strip().split()[0] for part in value.split(",") if part.strip()]


def check_static(build: Path) -> tuple[list[str], list[Path]]:
    problems: list[str] = []
    math_pages: list[Path] = []
    pages = sorted(build.rglob("*.html"))
    if not pages:
        return [f"{build}: no HTML pages (build the documentation first)"], []
    for page in pages:
        text = page.read_text(errors="replace")
        parser = Resources()
        parser.feed(text)
        rel = page.relative_to(build)
        for where, url in parser.fetched:
            if external(url):
                problems.append(f"{rel}: {where} loads {url} from outside the site")
        for match in re.finditer(r"<style[^>]*>(.*?)</style>", text, re.S):
            for url in CSS_URL.findall(match.group(1)):
                if external(url):
                    problems.append(f"{rel}: <style> loads {url} from outside the site")
        if 'class="math' in text:
            math_pages.append(page)
            if not any("mathjax" in s.lower() and not external(s) for s in parser.scripts):
                problems.append(f"{rel}: has math but does not load the bundled MathJax")
    for css in sorted(build.rglob("*.css")):
        for url in CSS_URL.findall(css.read_text(errors="replace")):
            if external(url):
                problems.append(f"{css.relative_to(build)}: loads {url} from outside the site")
    return problems, math_pages


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_browser(build: Path, pages: list[Path], chromium: str) -> list[str]:
    problems = []
    for page in pages:
        cmd = [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--allow-file-access-from-files", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri(),
        ]
        try:
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        except subprocess.TimeoutExpired:
            problems.append(f"{page.relative_to(build)}: Chromium timed out")
            continue
        typeset = dom.count("<mjx-container")
        raw = len(re.findall(r'<span class="math notranslate nohighlight">\s*\\[(\[]', dom))
        raw += len(re.findall(r'<div class="math notranslate nohighlight">\s*\\[(\[]', dom))
        if typeset == 0 or raw:
            problems.append(f"{page.relative_to(build)}: offline in Chromium, {typeset} formulas typeset and "
                            f"{raw} left as raw LaTeX")
        else:
            print(f"  {page.relative_to(build)}: {typeset} formulas typeset offline")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "_build" / "html")
    parser.add_argument("--browser", action="store_true", help="also render the pages with math in headless Chromium")
    args = parser.parse_args(argv)
    problems, math_pages = check_static(args.build)
    print(f"{len(list(args.build.rglob('*.html')))} pages scanned, {len(math_pages)} with math")
    if args.browser:
        chromium = find_chromium()
        if chromium is None:
            problems.append("--browser: no Chromium found")
        else:
            problems += check_browser(args.build, math_pages, chromium)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "offline: no page loads anything from outside the site")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
