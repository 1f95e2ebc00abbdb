"""Check a rendered book in a real headless browser, as a reader would open it.

The rendered HTML (Quarto's ``_book/`` or Jupyter Book's ``_build/html/``) is served on 127.0.0.1
(as ``quarto preview`` would: Quarto loads its scripts as ES modules, which Chromium refuses from
``file://``) and opened page by page in headless Chromium driven by Playwright. The book must read
offline, so every other request is refused, except scripts that the renderer links from the jsDelivr
npm CDN (Quarto's jquery and requirejs on notebook pages): those are answered from the same npm
packages, fetched once with ``npm pack`` into the cache. :func:`check_book` returns a list of
problems, empty when the book is sound:

1. Pages: every ``*.html`` under the folder, except those in folders starting with ``_`` (theme
   assets, sources). A page that fails to load, a JavaScript error (except the renderer's own,
   harmless ones in ``KNOWN_RENDERER_ERRORS``), a failed request for a local file and a request
   for anything outside the book are problems.
2. Figures: after forcing every ``<img>`` to load eagerly and waiting for it to decode, each image
   must have ``naturalWidth > 0`` and come from the book itself.
3. Error cells: an element whose class names an error output (Jupyter's ``output_error``, Quarto's
   ``cell-output-error``, MyST-NB's ``traceback``), and a stderr output whose text holds a
   ``Traceback``.
4. Text a reader should not see: the page's text outside code listings must not contain
   ``FORBIDDEN_TEXT`` (warnings, tracebacks, progress bars), and the page's HTML must not contain
   the absolute path of the checkout that built it (``forbidden_paths``).
5. Headings that show raw Quarto attributes (``{.unnumbered}``, ``{#sec-x}``): markup that a
   renderer other than Quarto passed through as text.
6. Layout, at a 1280 x 900 viewport: every page has the book's sidebar; no page is wider than the
   viewport (content cut off or scrolled sideways); no image is wider than its column.
7. Contents: every local link target (in the navigation and the text) must exist, and a link to
   ``page.html#anchor`` must find that anchor on the page (cross-references), and so must the URL
   an interactive figure's point opens when clicked (``layout.meta["click_opens"]``,
   :mod:`c2srepro.book.display`: a graph node's link to its feature card); every content page
   must be listed in the navigation of ``index.html`` (Sphinx's ``genindex``/``search`` pages
   excepted). With ``chapters`` (the book's chapter list, e.g.
   :func:`c2srepro.book.runner.book_pages`), each chapter must have its page.
8. Interactive figures: every plotly figure (``.plotly-graph-div``) must be drawn, i.e. become a
   ``.js-plotly-plot`` with at least one trace in its SVG, within ``PLOTLY_WAIT_MS``; one that is
   not drawn (plotly.js missing or failing) is a problem. plotly.js must come with the page: a
   request for it from anywhere outside the book is a problem even where npm could supply it.
9. Figures in place: a ``<figure>`` with a caption must hold content besides its caption and its
   code (an image, a plotly figure, a table, a cell's output) with a drawn size, and that content
   must lie within the figure's box; every plotly figure must lie in the page's content column.
   (Quarto once hoisted an output carrying plotly.js into the page's head: the graph was drawn
   over the page header and its figure was an empty caption.)
10. With ``screenshot``: a full-page PNG of the first page showing a figure (else of index.html);
   with ``screenshot_dir``: a full-page PNG of every page, named after it.

:func:`open_page` opens one page of any served folder the same way (offline, CDN scripts from npm
packages or given files) and reports what matched a selector, JavaScript errors and refused
requests: the check of the files for circuit-tracer's graph viewer uses it.

Chromium is found at ``$C2SREPRO_CHROMIUM``, else as ``chromium`` / ``chromium-browser`` on PATH
(Debian: ``apt-get install -y chromium``). Playwright's own browser download is not used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from c2srepro._cache import cache_dir

log = logging.getLogger("c2srepro.book.browser")

CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
)
VIEWPORT = {"width": 1280, "height": 900}
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set C2SREPRO_CHROMIUM to its path"
# Sphinx's generated pages that no table of contents lists.
AUXILIARY_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
ERROR_SELECTOR = '[class*="output_error"], [class*="cell-output-error"], [class*="traceback"]'
NAV_SELECTOR = "nav a[href], #quarto-sidebar a[href], .bd-sidebar a[href], .sidebar a[href]"
SIDEBAR_SELECTOR = "#quarto-sidebar, .bd-sidebar-primary, .bd-sidebar"
COLUMN_SELECTOR = "main, #quarto-document-content, .bd-article, article"
# Code cells' sources may legitimately name these (logging.WARNING); outputs and prose may not.
CODE_SELECTOR = ".cell-code, details.code-fold, .cell_input, script, style, noscript"
FORBIDDEN_TEXT = ("Warning", "WARNING", "Traceback", "it/s]")
# jsDelivr's and unpkg's npm URLs: https://cdn.jsdelivr.net/npm/NAME@VERSION/PATH,
# https://unpkg.com/NAME@VERSION/PATH (NAME may be @scope/name).
SCRIPT_TAG = re.compile(r'<script[^>]*\ssrc="(https://cdn\.jsdelivr\.net/npm/[^"]+)"[^>]*>')
NPM_CDN = re.compile(r"^https://(?:cdn\.jsdelivr\.net/npm|unpkg\.com)/((?:@[^/@]+/)?[^/@]+)@([^/]+)/(.+)$")
# JavaScript errors of the renderer itself, not of the book's content, with why each is harmless.
KNOWN_RENDERER_ERRORS = {
    "Identifier 'THEBE_JS_URL' has already been declared":
        "Jupyter Book 1 with sphinx-thebe 0.3.1 writes the thebe settings script twice on every page; only the "
        "online live-code button reads it",
}
_QUARTO_ATTRIBUTES = re.compile(r"\{[.#][\w:-][^}]*\}")
PLOTLY_WAIT_MS = 10_000
_PLOTLY_URL = re.compile(r"plotly", re.IGNORECASE)

# Runs in the page: load every image eagerly, wait for each to decode (or fail), report them with
# their rendered width and the width of the content column they sit in.
_IMAGES_JS = """
async (columnSelector) => {
  const images = Array.from(document.images);
  for (const img of images) { img.loading = "eager"; }
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  return images.map(img => {
    const column = img.closest(columnSelector);
    return {src: img.currentSrc || img.src, width: img.naturalWidth,
            shown: img.getBoundingClientRect().width,
            column: column ? column.getBoundingClientRect().width : null};
  });
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
# Runs in the page: wait (up to a limit) until every plotly figure has drawn a trace; report each.
_PLOTLY_JS = """
async (waitMs) => {
  const figures = Array.from(document.querySelectorAll(".plotly-graph-div"));
  const traces = e => e.classList.contains("js-plotly-plot") ? e.querySelectorAll(".main-svg .trace").length : 0;
  const start = Date.now();
  while (!figures.every(e => traces(e) > 0) && Date.now() - start < waitMs) {
    await new Promise(resolve => setTimeout(resolve, 100));
  }
  return figures.map(e => ({id: e.id, traces: traces(e)}));
}
"""
# A figure's content: what a cell draws or shows (the figure's code and caption are not content).
# A Markdown output (a prompt shown as text) arrives in its figure as paragraphs and a code block.
FIGURE_CONTENT_SELECTOR = ("img, svg, canvas, iframe, video, table, .plotly-graph-div, .cell-output-display, "
                           ".cell-output-stdout, .cell_output, p, pre")
FIGURE_CODE_SELECTOR = ".cell-code, details.code-fold, .cell_input"
# Runs in the page: every captioned figure's content, and where it lies (step 9).
_FIGURES_JS = """
([columnSelector, contentSelector, codeSelector]) => {
  const found = [];
  const drawn = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  for (const figure of document.querySelectorAll("figure")) {
    const caption = figure.querySelector("figcaption");
    if (!caption) continue;
    const name = caption.innerText.replace(/\\s+/g, " ").trim().slice(0, 80) || figure.id || "(no caption text)";
    const content = Array.from(figure.querySelectorAll(contentSelector))
      .filter(e => !e.closest("figcaption") && !e.closest(codeSelector) && drawn(e));
    const outer = content.filter(e => !content.some(o => o !== e && o.contains(e)));
    if (outer.length === 0) { found.push({figure: name, problem: "empty"}); continue; }
    const box = figure.getBoundingClientRect();
    const outside = outer.find(e => { const r = e.getBoundingClientRect();
      return r.left < box.left - 2 || r.right > box.right + 2 || r.top < box.top - 2 || r.bottom > box.bottom + 2; });
    if (outside) found.push({figure: name, problem: "outside", what: outside.tagName.toLowerCase() +
                             (outside.id ? "#" + outside.id : "")});
  }
  for (const e of document.querySelectorAll(".plotly-graph-div")) {
    if (!e.closest(columnSelector)) found.push({figure: e.id || "(no id)", problem: "plotly outside the column"});
  }
  return found;
}
"""
_READER_TEXT_JS = """
(codeSelector) => {
  const body = document.body.cloneNode(true);
  for (const e of body.querySelectorAll(codeSelector)) { e.remove(); }
  return body.textContent;
}
"""
# The URLs a click on an interactive figure's points opens (c2srepro.book.display), made absolute.
_CLICK_LINKS_JS = """els => els.flatMap(gd => {
  const column = gd.layout && gd.layout.meta ? gd.layout.meta.click_opens : undefined;
  if (column === undefined || column === null) return [];
  return gd.data.flatMap(t => (t.customdata || []).map(c => c[column]).filter(u => u))
                .map(u => new URL(u, location.href).href);
})"""
_LAYOUT_JS = """
(sidebarSelector) => ({
  scrollWidth: document.documentElement.scrollWidth,
  viewport: window.innerWidth,
  sidebar: document.querySelector(sidebarSelector) !== null,
  ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id),
})
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


def npm_package_dir(name: str, version: str, *, vendor_dir: Path | None = None) -> Path:
    """The unpacked npm package ``name@version`` (its ``package/`` folder), fetched with ``npm pack``
    into ``vendor_dir`` (default: the c2srepro cache) on first use."""
    vendor_dir = Path(vendor_dir) if vendor_dir is not None else cache_dir("npm")
    target = vendor_dir / f"{name.replace('/', '+')}@{version}"
    if (target / "package").is_dir():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"the book links {name}@{version} from a CDN; supplying it offline needs npm "
                                "(apt-get install -y npm)")
    vendor_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vendor_dir) as staging:
        packed = subprocess.run([npm, "pack", f"{name}@{version}", "--json", "--pack-destination", staging],
                                capture_output=True, text=True)
        if packed.returncode != 0:
            raise FileNotFoundError(f"npm pack {name}@{version} failed: {packed.stderr.strip()[-300:]}")
        tarball = Path(staging) / json.loads(packed.stdout)[0]["filename"]
        unpacked = Path(staging) / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        os.replace(unpacked, target)
    return target / "package"


def _npm_substitute(url: str, vendor_dir: str | os.PathLike | None) -> Path | None:
    """The file of the npm package that a jsDelivr or unpkg npm URL serves, or None for any other URL."""
    cdn = NPM_CDN.match(url.split("?")[0])
    if cdn is None:
        return None
    name, version, path = cdn.groups()
    file = npm_package_dir(name, version, vendor_dir=vendor_dir) / path
    if not file.is_file() and file.name.endswith(".min.js"):
        # jsDelivr minifies on the fly a file the package ships only unminified (requirejs ships
        # require.js, Quarto links require.min.js): the same code, other bytes.
        file = file.with_name(file.name.removesuffix(".min.js") + ".js")
    return file if file.is_file() else None


def _accept_npm_substitutes(html: str, vendor_dir: str | os.PathLike | None) -> str:
    """The page as served for the check: a CDN script whose npm file is the same code but not the
    same bytes as jsDelivr's minified one (so its integrity hash cannot match) loses its
    ``integrity`` attribute; every other script, and every matching hash, is left as it is."""

    def check(match: re.Match) -> str:
        tag, url = match.group(0), match.group(1)
        file = _npm_substitute(url, vendor_dir)
        declared = re.search(r'\sintegrity="([^"]*)"', tag)
        if file is None or declared is None:
            return tag
        digest = "sha384-" + base64.b64encode(hashlib.sha384(file.read_bytes()).digest()).decode()
        if digest in declared.group(1).split():
            return tag
        log.info("serving %s for %s (unminified, so its integrity hash differs)", file.name, url)
        return tag.replace(declared.group(0), "")

    return SCRIPT_TAG.sub(check, html)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the check reports failed requests itself
        pass


@contextlib.contextmanager
def serve(html_dir: Path) -> Iterator[str]:
    """Serve ``html_dir`` on 127.0.0.1 (a free port) for the duration; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def check_book(html_dir: str | os.PathLike, *, screenshot: str | os.PathLike | None = None,
               screenshot_dir: str | os.PathLike | None = None, chapters: Sequence[str] | None = None,
               forbidden_paths: Sequence[str | os.PathLike] = (), vendor_dir: str | os.PathLike | None = None,
               timeout_ms: int = 30_000) -> list[str]:
    """Open every page of the rendered book in headless Chromium; return the problems found.

    html_dir: the folder holding the book's ``index.html``. screenshot / screenshot_dir: PNGs to
    write (step 9 of the module docstring). chapters: source paths relative to the book
    (``index.qmd``, ``chapters/01-model.ipynb``); each must have rendered to its ``.html``.
    forbidden_paths: absolute paths no page may contain (the checkout, the cache). vendor_dir:
    where npm packages for CDN scripts are unpacked. Raises FileNotFoundError when the folder has
    no index.html or Chromium is missing, ImportError when Playwright is not installed.
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
    forbidden_paths = [str(Path(p)) for p in forbidden_paths]
    problems: list[str] = []
    linked: dict[tuple[Path, str], set[str]] = {}  # (target file, fragment) -> pages linking to it
    anchors: dict[Path, set[str]] = {}
    nav_of_index: set[Path] = set()
    figure_page: Path | None = None
    with serve(html_dir) as base, sync_playwright() as playwright:

        def local(url: str) -> Path | None:
            return html_dir / unquote(urlsplit(url).path).lstrip("/") if url.startswith(base) else None

        def route(route, request):
            url = request.url
            target = local(url)
            if target is not None and target.suffix == ".html" and target.is_file():
                return route.fulfill(body=_accept_npm_substitutes(target.read_text(), vendor_dir),
                                     content_type="text/html; charset=utf-8")
            if url.startswith(base) or url.startswith(("data:", "blob:", "about:")):
                return route.continue_()
            if _PLOTLY_URL.search(url):
                plotly_cdn.append(url)
                return route.abort()
            file = _npm_substitute(url, vendor_dir)
            if file is not None:
                return route.fulfill(path=str(file), headers={"Access-Control-Allow-Origin": "*"})
            outside.append(url)
            return route.abort()

        outside: list[str] = []
        plotly_cdn: list[str] = []
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.route(re.compile(".*"), route)
            for page_path in pages:
                name = str(page_path.relative_to(html_dir))
                url = base + page_path.relative_to(html_dir).as_posix()
                page = context.new_page()
                page.set_default_timeout(timeout_ms)
                failed: list[str] = []
                outside.clear()
                plotly_cdn.clear()
                page.on("pageerror", lambda error, failed=failed: None if str(error) in KNOWN_RENDERER_ERRORS
                        else failed.append(f"JavaScript error: {error}"))
                page.on("requestfailed", lambda request, failed=failed: failed.append(
                    f"missing local file {request.url}") if request.url.startswith(base) else None)
                page.on("response", lambda response, failed=failed: failed.append(
                    f"missing local file {response.url} (HTTP {response.status})")
                    if response.url.startswith(base) and response.status >= 400 else None)
                try:
                    page.goto(url, wait_until="load")
                except Exception as error:  # Playwright raises its own Error/TimeoutError types
                    problems.append(f"{name}: page did not load ({error})")
                    page.close()
                    continue
                images = page.evaluate(_IMAGES_JS, COLUMN_SELECTOR)
                for image in images:
                    src = image["src"]
                    if not (src.startswith(base) or src.startswith("data:")):
                        problems.append(f"{name}: image {src} is fetched from the network")
                    elif image["width"] <= 0:
                        problems.append(f"{name}: image {src[:120]} did not load (naturalWidth 0)")
                    elif image["column"] is not None and image["shown"] > image["column"] + 1:
                        problems.append(f"{name}: image {src.rsplit('/', 1)[-1][:80]} is wider than its column "
                                        f"({image['shown']:.0f} px > {image['column']:.0f} px)")
                if figure_page is None and any(i["width"] > 0 for i in images):
                    figure_page = page_path
                for figure in page.evaluate(_PLOTLY_JS, PLOTLY_WAIT_MS):
                    if figure["traces"] == 0:
                        problems.append(f"{name}: interactive figure {figure['id'] or '(no id)'} was not drawn "
                                        "(plotly.js missing or failed: embed it with include_plotlyjs=True)")
                for found in page.evaluate(_FIGURES_JS, [COLUMN_SELECTOR, FIGURE_CONTENT_SELECTOR, FIGURE_CODE_SELECTOR]):
                    if found["problem"] == "empty":
                        problems.append(f"{name}: figure {found['figure']!r} has no content above its caption "
                                        "(nothing drawn in it but its code)")
                    elif found["problem"] == "outside":
                        problems.append(f"{name}: figure {found['figure']!r}: its content ({found['what']}) lies "
                                        "outside the figure")
                    else:
                        problems.append(f"{name}: interactive figure {found['figure']} lies outside the page's "
                                        "content column (drawn over the page's header?)")
                for text in page.evaluate(_ERRORS_JS, ERROR_SELECTOR):
                    # A traceback's last line names the exception.
                    lines = [line for line in text.splitlines() if line.strip()]
                    problems.append(f"{name}: error output: {lines[-1].strip() if lines else '(empty)'}")
                reader_text = page.evaluate(_READER_TEXT_JS, CODE_SELECTOR)
                for word in FORBIDDEN_TEXT:
                    at = reader_text.find(word)
                    if at >= 0:
                        context_text = " ".join(reader_text[max(0, at - 60):at + 60].split())
                        problems.append(f"{name}: shows {word!r} to the reader: ...{context_text}...")
                html = page.content()
                for path in forbidden_paths:
                    if path in html:
                        problems.append(f"{name}: shows the absolute path {path}")
                for heading in page.eval_on_selector_all("h1, h2, h3, h4", "els => els.map(e => e.innerText)"):
                    if _QUARTO_ATTRIBUTES.search(heading):
                        problems.append(f"{name}: heading shows raw Quarto attributes: {heading.strip()!r}")
                layout = page.evaluate(_LAYOUT_JS, SIDEBAR_SELECTOR)
                if not layout["sidebar"]:
                    problems.append(f"{name}: has no sidebar (the book's navigation)")
                if layout["scrollWidth"] > layout["viewport"] + 1:
                    problems.append(f"{name}: is wider than the viewport ({layout['scrollWidth']} px > "
                                    f"{layout['viewport']} px): content is cut off")
                anchors[page_path.resolve()] = set(layout["ids"])
                hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
                for href in hrefs + page.eval_on_selector_all(".js-plotly-plot", _CLICK_LINKS_JS):
                    target = local(href)
                    if target is not None:
                        fragment = unquote(urlsplit(href).fragment)
                        linked.setdefault((target.resolve(), fragment), set()).add(name)
                if page_path == html_dir / "index.html":
                    nav = page.eval_on_selector_all(NAV_SELECTOR, "els => els.map(e => e.href)")
                    nav_of_index = {t.resolve() for t in map(local, nav) if t is not None}
                problems.extend(f"{name}: {message}" for message in failed)
                problems.extend(f"{name}: requests {url} from outside the book (offline it fails)"
                                for url in dict.fromkeys(outside))
                problems.extend(f"{name}: loads plotly.js from {url}, outside the book: embed it in the page "
                                "(include_plotlyjs=True, c2srepro.book.display.interactive)"
                                for url in dict.fromkeys(plotly_cdn))
                if screenshot_dir is not None:
                    shot_path = Path(screenshot_dir) / (name.removesuffix(".html").replace("/", "-") + ".png")
                    shot_path.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot_path), full_page=True)
                page.close()
            if screenshot is not None:
                shot = context.new_page()
                shot.goto(base + (figure_page or html_dir / "index.html").relative_to(html_dir).as_posix(),
                          wait_until="load")
                shot.evaluate(_IMAGES_JS, COLUMN_SELECTOR)
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                shot.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    for (target, fragment), sources in sorted(linked.items()):
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"{', '.join(sorted(sources))}: link to missing file {target}")
        elif fragment and target in anchors and fragment not in anchors[target]:
            problems.append(f"{', '.join(sorted(sources))}: link to {target.name}#{fragment}, which has no such anchor")
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


def _substitute_file(part: tuple[str, str, str] | Path, vendor_dir: str | os.PathLike | None) -> Path:
    if isinstance(part, Path):
        return part
    name, version, path = part
    file = npm_package_dir(name, version, vendor_dir=vendor_dir) / path
    if not file.is_file():
        raise FileNotFoundError(f"npm package {name}@{version} has no file {path}")
    return file


@dataclass(frozen=True)
class PageCheck:
    """What :func:`open_page` saw: elements matching the selector, errors, refused requests."""

    count: int  # elements matching ``selector`` once the page settled (0 if none appeared in time)
    errors: list[str]  # JavaScript errors and failed local requests
    refused: list[str]  # requests for anything outside the folder that no npm package answers
    value: object = None  # what ``evaluate`` returned


def open_page(
    root: str | os.PathLike,
    page: str,
    *,
    selector: str,
    substitutes: Mapping[str, Sequence[tuple[str, str, str] | Path]] | None = None,
    vendor_dir: str | os.PathLike | None = None,
    evaluate: str | None = None,
    screenshot: str | os.PathLike | None = None,
    timeout_ms: int = 30_000,
) -> PageCheck:
    """Serve ``root`` on 127.0.0.1, open ``page`` (a path below it, with its query) in headless
    Chromium offline, and wait until an element matches ``selector``.

    Requests outside the folder are answered from npm packages: jsDelivr and unpkg npm URLs, and
    each URL that ``substitutes`` maps to files: npm files (package, version, path) or local
    paths, several served as one script in order; any other request is refused and listed. ``evaluate``: a
    JavaScript function (may be async) run in the page once it settled; its result is ``value``.
    """
    root = Path(root).resolve()
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
    executable = find_chromium()
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise ImportError("open_page needs Playwright for Python: `pip install playwright` "
                          "(no browser download is needed; it drives the system Chromium)") from error
    errors: list[str] = []
    refused: list[str] = []
    with serve(root) as base, sync_playwright() as playwright:

        def route(route, request):
            url = request.url
            if url.startswith(base) or url.startswith(("data:", "blob:", "about:")):
                return route.continue_()
            parts = (substitutes or {}).get(url.split("?")[0])
            if parts:
                body = b"\n;\n".join(_substitute_file(part, vendor_dir).read_bytes() for part in parts)
                return route.fulfill(body=body, content_type="text/javascript",
                                     headers={"Access-Control-Allow-Origin": "*"})
            file = _npm_substitute(url, vendor_dir)
            if file is not None:
                return route.fulfill(path=str(file), headers={"Access-Control-Allow-Origin": "*"})
            refused.append(url)
            return route.abort()

        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.route(re.compile(".*"), route)
            tab = context.new_page()
            tab.set_default_timeout(timeout_ms)
            tab.on("pageerror", lambda error: errors.append(f"JavaScript error: {error}"))
            tab.on("requestfailed", lambda request: errors.append(f"missing local file {request.url}")
                   if request.url.startswith(base) else None)
            tab.on("response", lambda response: errors.append(f"HTTP {response.status} for {response.url}")
                   if response.url.startswith(base) and response.status >= 400 else None)
            tab.goto(base + page.lstrip("/"), wait_until="load")
            try:
                tab.wait_for_selector(selector, state="attached")
            except PlaywrightTimeout:
                pass  # reported as count 0 with the errors that explain it
            count = tab.eval_on_selector_all(selector, "els => els.length")
            value = tab.evaluate(evaluate) if evaluate is not None else None
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return PageCheck(count=count, errors=list(dict.fromkeys(errors)), refused=list(dict.fromkeys(refused)),
                     value=value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book.browser", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", help="the rendered book: _book/<profile>")
    parser.add_argument("--screenshot", help="write a PNG of a page with a figure here")
    parser.add_argument("--screenshots", help="write a full-page PNG of every page into this folder")
    parser.add_argument("--forbid", action="append", default=[], metavar="PATH",
                        help="an absolute path no page may show (default: the current directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from c2srepro.book import runner

    try:
        # The rendered book sits below the checkout's _quarto.yml (_book/<profile>/): every chapter must have a page.
        chapters = runner.book_pages(runner.project_root(args.html_dir))
    except FileNotFoundError:
        chapters = None
    try:
        problems = check_book(args.html_dir, screenshot=args.screenshot, screenshot_dir=args.screenshots,
                              chapters=chapters, forbidden_paths=args.forbid or [Path.cwd().resolve()])
    except (FileNotFoundError, ImportError, ValueError) as error:
        log.error("%s", error)
        return 2
    for problem in problems:
        log.error("%s", problem)
    log.info("%d pages checked, %d problems", len(_pages(Path(args.html_dir))), len(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
