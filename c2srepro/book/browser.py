"""Check a rendered book in a real headless browser: figures load, no error cells, the contents resolve.

The rendered HTML (Quarto's ``_book/`` or Jupyter Book's ``_build/html/``) is opened page by page in
headless Chromium driven by Playwright, from ``file://`` URLs, with every network request blocked
(the book must read offline). :func:`check_book` returns a list of problems, empty when the book is
sound:

1. Pages: every ``*.html`` under the folder, except those in folders starting with ``_`` (theme
   assets, sources). A page that fails to load, a JavaScript error (except the renderer's own,
   harmless ones in ``KNOWN_RENDERER_ERRORS``) and a failed request for a local file (a missing
   stylesheet, script or image) are problems.
2. Figures: after forcing every ``<img>`` to load eagerly and waiting for it to decode, each image
   must have ``naturalWidth > 0``; an image fetched from the network is a problem too.
3. Error cells: an element whose class names an error output (Jupyter's ``output_error``, Quarto's
   ``cell-output-error``, MyST-NB's ``traceback``), and a stderr output whose text holds a
   ``Traceback``.
4. Headings that show raw Quarto attributes (``{.unnumbered}``, ``{#sec-x}``): markup that a
   renderer other than Quarto passed through as text.
5. Contents: every local link target (in the navigation and the text) must exist; every content
   page must be listed in the navigation of ``index.html`` (Sphinx's ``genindex``/``search`` pages
   excepted); the linked pages load as part of step 1. With ``chapters`` (the book's chapter list,
   e.g. :func:`c2srepro.book.chapter_files`), each chapter must have its page: a stale or partial
   render is a problem.
6. With ``screenshot``: a full-page PNG of the first page showing a figure (else of index.html).

Chromium is found at ``$C2SREPRO_CHROMIUM``, else as ``chromium`` / ``chromium-browser`` on PATH
(Debian: ``apt-get install -y chromium``). Playwright's own browser download is not used.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger("c2srepro.book.browser")

CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
)
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set C2SREPRO_CHROMIUM to its path"
# Sphinx's generated pages that no table of contents lists.
AUXILIARY_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
ERROR_SELECTOR = '[class*="output_error"], [class*="cell-output-error"], [class*="traceback"]'
NAV_SELECTOR = "nav a[href], #quarto-sidebar a[href], .bd-sidebar a[href], .sidebar a[href]"
# JavaScript errors of the renderer itself, not of the book's content, with why each is harmless.
KNOWN_RENDERER_ERRORS = {
    "Identifier 'THEBE_JS_URL' has already been declared":
        "Jupyter Book 1 with sphinx-thebe 0.3.1 writes the thebe settings script twice on every page; only the "
        "online live-code button reads it",
}
_QUARTO_ATTRIBUTES = re.compile(r"\{[.#][\w:-][^}]*\}")

# Runs in the page: load every image eagerly, wait for each to decode (or fail), report them.
_IMAGES_JS = """
async () => {
  const images = Array.from(document.images);
  for (const img of images) { img.loading = "eager"; }
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  return images.map(img => ({src: img.currentSrc || img.src, width: img.naturalWidth}));
}
"""
_ERRORS_JS = """
(selector) => {
  const found = Array.from(document.querySelectorAll(selector)).map(e => e.innerText.slice(-300));
  for (const e of document.querySelectorAll('[class*="stderr"]')) {
    if (e.innerText.includes("Traceback")) found.push(e.innerText.slice(-300));
  }
  return found;
}
"""


def find_chromium() -> str:
    """The Chromium executable: ``$C2SREPRO_CHROMIUM``, else ``chromium``/``chromium-browser`` on PATH."""
    configured = os.environ.get("C2SREPRO_CHROMIUM")
    if configured:
        if not Path(configured).is_file():
            raise FileNotFoundError(f"C2SREPRO_CHROMIUM={configured} does not exist: {INSTALL_HINT}")
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"Chromium is not installed (no chromium or chromium-browser on PATH): {INSTALL_HINT}")


def _pages(html_dir: Path) -> list[Path]:
    return sorted(p for p in html_dir.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(html_dir).parts[:-1]))


def _local_path(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def check_book(html_dir: str | os.PathLike, *, screenshot: str | os.PathLike | None = None,
               chapters: Sequence[str] | None = None, timeout_ms: int = 30_000) -> list[str]:
    """Open every page of the rendered book in headless Chromium; return the problems found.

    html_dir: the folder holding the book's ``index.html``. screenshot: where to write a PNG of a
    page (step 6 of the module docstring). chapters: source paths relative to the book
    (``index.qmd``, ``chapters/01-model.ipynb``); each must have rendered to its ``.html``. Raises FileNotFoundError when the folder has no
    index.html or Chromium is missing, ImportError when Playwright is not installed.
    """
    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"no index.html in {html_dir}: render the book first (make book)")
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
    executable = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise ImportError("check_book needs Playwright for Python: `pip install playwright` "
                          "(no browser download is needed; it drives the system Chromium)") from error

    pages = _pages(html_dir)
    problems: list[str] = []
    linked: dict[Path, set[str]] = {}  # target file -> pages linking to it
    nav_of_index: set[Path] = set()
    figure_page: Path | None = None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            # The book must work offline: refuse every request that is not a local file or inline data.
            context.route(re.compile(r"^(?!file:|data:|blob:|about:).*"), lambda route: route.abort())
            for page_path in pages:
                name = str(page_path.relative_to(html_dir))
                page = context.new_page()
                page.set_default_timeout(timeout_ms)
                failed: list[str] = []
                page.on("pageerror", lambda error, failed=failed: None if str(error) in KNOWN_RENDERER_ERRORS
                        else failed.append(f"JavaScript error: {error}"))
                page.on("requestfailed", lambda request, failed=failed: failed.append(
                    f"missing local file {request.url}") if request.url.startswith("file:") else None)
                try:
                    page.goto(page_path.as_uri(), wait_until="load")
                except Exception as error:  # Playwright raises its own Error/TimeoutError types
                    problems.append(f"{name}: page did not load ({error})")
                    page.close()
                    continue
                images = page.evaluate(_IMAGES_JS)
                for image in images:
                    src = image["src"]
                    if not src.startswith(("file:", "data:")):
                        problems.append(f"{name}: image {src} is fetched from the network")
                    elif image["width"] <= 0:
                        problems.append(f"{name}: image {src[:120]} did not load (naturalWidth 0)")
                if figure_page is None and any(i["width"] > 0 for i in images):
                    figure_page = page_path
                for text in page.evaluate(_ERRORS_JS, ERROR_SELECTOR):
                    # A traceback's last line names the exception.
                    lines = [line for line in text.splitlines() if line.strip()]
                    problems.append(f"{name}: error output: {lines[-1].strip() if lines else '(empty)'}")
                for heading in page.eval_on_selector_all("h1, h2, h3, h4", "els => els.map(e => e.innerText)"):
                    if _QUARTO_ATTRIBUTES.search(heading):
                        problems.append(f"{name}: heading shows raw Quarto attributes: {heading.strip()!r}")
                for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                    target = _local_path(href)
                    if target is not None:
                        linked.setdefault(target, set()).add(name)
                if page_path == html_dir / "index.html":
                    nav = page.eval_on_selector_all(NAV_SELECTOR, "els => els.map(e => e.href)")
                    nav_of_index = {t.resolve() for t in map(_local_path, nav) if t is not None}
                problems.extend(f"{name}: {message}" for message in failed)
                page.close()
            if screenshot is not None:
                shot = context.new_page()
                shot.goto((figure_page or html_dir / "index.html").as_uri(), wait_until="load")
                shot.evaluate(_IMAGES_JS)
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                shot.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    for target, sources in sorted(linked.items()):
        if not target.exists():
            problems.append(f"{', '.join(sorted(sources))}: link to missing file {target}")
    for page_path in pages:
        if page_path.name in AUXILIARY_PAGES or page_path == html_dir / "index.html":
            continue
        if page_path.resolve() not in nav_of_index:
            problems.append(f"{page_path.relative_to(html_dir)}: not listed in the table of contents of index.html")
    for chapter in chapters or ():
        page_path = (html_dir / chapter).with_suffix(".html")
        if not page_path.is_file():
            problems.append(f"{page_path.relative_to(html_dir)}: chapter {chapter} has no rendered page")
    return list(dict.fromkeys(problems))  # a heading repeated in the page's header is one problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book.browser", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", help="the rendered book: results/<profile>/book/_build/html or .../_book")
    parser.add_argument("--screenshot", help="write a PNG of a page here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from c2srepro.book import runner as book

    try:
        # The rendered book sits below its _quarto.yml (results/<profile>/book/): check every chapter has a page.
        chapters = book.chapter_files(book.project_root(args.html_dir))
    except FileNotFoundError:
        chapters = None
    try:
        problems = check_book(args.html_dir, screenshot=args.screenshot, chapters=chapters)
    except (FileNotFoundError, ImportError, ValueError) as error:
        log.error("%s", error)
        return 2
    for problem in problems:
        log.error("%s", problem)
    log.info("%d pages checked, %d problems", len(_pages(Path(args.html_dir))), len(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
