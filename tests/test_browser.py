"""The rendered book in real headless Chromium (Playwright): figures load, no error cells, contents resolve."""

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from _toy_book import write_project
from c2srepro.book import runner as book
from c2srepro.book.browser import check_book, find_chromium, open_page

FIGURE_CELL = """\
#| label: fig-toy
#| fig-cap: "A toy figure with a caption."
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2], [scale * v for v in (0, 1, 4)], marker="o")
ax.set(title="toy figure", xlabel="x", ylabel="y")
plt.show()"""
TABLE_CELL = 'pd.DataFrame({"layer": [0, 1], "fraction": [0.5 * scale, 0.75]})'
# The library's interactive graph of a tiny attribution graph that the test saved beside the book.
INTERACTIVE_CELL = """\
#| label: fig-toy-graph
#| fig-cap: "The toy attribution graph, interactive."
from c2srepro.attribution import Graph
from c2srepro.attribution.plots import graph_figure
from c2srepro.book.display import interactive
graph = Graph.load("toy-graph.safetensors")
features = graph.nodes[graph.nodes["kind"] == "feature"]
cards = {(int(layer), int(feature)): "figures.html" for layer, feature in zip(features["layer"], features["feature"])}
interactive(graph_figure(graph, node_threshold=1.0, edge_threshold=1.0, links=cards))"""
# A chapter that runs to the end (papermill stops on a raised error) yet shows a traceback on stderr.
STDERR_TRACEBACK_CELL = """\
import traceback
try:
    raise ValueError("caught and printed")
except ValueError:
    traceback.print_exc()"""


OVERRIDES = ["scale=2.0"]


def _notebook(path: Path, title: str, cells: list[tuple[str, list[str]]]) -> None:
    notebook = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "default"\nresults_dir = "results/default"\nscale = 1.0')
    params.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), params]
    for source, tags in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = tags
        notebook.cells.append(cell)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def _execute(root: Path, chapters: dict[str, tuple[str, list]]) -> Path:
    """A toy book executed by the book runner; returns its root."""
    (root / "chapters" / "profiles").mkdir(parents=True)
    if "interactive" in chapters:
        from _tiny_neox import GENES, TOKENS, sentence_replacement

        from c2srepro.attribution import build_graph

        rep = sentence_replacement()
        target = rep.logit_node(rep.n_pos - 1, 5)
        build_graph(rep, target, tokens=TOKENS, genes=GENES).save(root / "toy-graph.safetensors")
    (root / "chapters" / "profiles" / "default.yml").write_text("all: {}\nchapters: {}\n")
    (root / "index.qmd").write_text("# Toy book\n\nA toy book for the browser check, profile {{< var profile >}}.\n")
    write_project(root, ["index.qmd", *(f"chapters/{name}.ipynb" for name in chapters)])
    for name, (title, cells) in chapters.items():
        _notebook(root / "chapters" / f"{name}.ipynb", title, cells)
    out = book.execute_chapters(root, "default", overrides=OVERRIDES)
    if "broken" in chapters:
        # An error output as a kernel writes it, which papermill would refuse to leave in a chapter:
        # the check must still catch it in a book rendered from other notebooks.
        executed = nbformat.read(out / "chapters" / "broken.ipynb", as_version=4)
        executed.cells[-1].outputs.append(nbformat.v4.new_output(
            "error", ename="RuntimeError", evalue="an uncaught error",
            traceback=["Traceback (most recent call last):", "RuntimeError: an uncaught error"]))
        executed.cells[-1].outputs.append(nbformat.v4.new_output(
            "stream", name="stdout", text="Traceback (most recent call last):\nValueError: caught and printed\n"))
        nbformat.write(executed, out / "chapters" / "broken.ipynb")
    return root


@pytest.fixture(scope="module")
def toy_book(tmp_path_factory) -> Path:
    return _execute(tmp_path_factory.mktemp("toybook"), {
        "figures": ("Figures and tables", [(FIGURE_CELL, []), (TABLE_CELL, [])]),
        "broken": ("A chapter with errors", [(STDERR_TRACEBACK_CELL, [])]),
        "interactive": ("An interactive graph", [(INTERACTIVE_CELL, [])]),
    })


@pytest.fixture(scope="module", params=["jupyter-book", "quarto"])
def rendered(request, toy_book, tmp_path_factory) -> tuple[str, Path]:
    """The toy book rendered by the fallback (Jupyter Book) and by the real Quarto."""
    if request.param == "quarto" and shutil.which("quarto") is None:
        raise FileNotFoundError("quarto is not on PATH: `make quarto` (or install Quarto) before the tests")
    copy = tmp_path_factory.mktemp(request.param) / "toy"
    shutil.copytree(toy_book, copy)
    # Quarto's pre-render (or the fallback) finds every chapter unchanged, the planted error included.
    return request.param, book.render(copy, "default", renderer=request.param, overrides=OVERRIDES).parent


@pytest.fixture(scope="module")
def toy_html(rendered) -> Path:
    return rendered[1]


def test_chromium_is_installed():
    # Fails (never skips) where the system browser is missing, naming the install command.
    path = find_chromium()
    assert Path(path).is_file()


def test_missing_chromium_names_the_install_command(toy_html, tmp_path, monkeypatch):
    monkeypatch.setenv("C2SREPRO_CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y chromium"):
        check_book(toy_html)


def test_missing_book_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.html.*make book"):
        check_book(tmp_path)


def test_rendered_book_in_chromium(rendered, tmp_path):
    renderer, html = rendered
    shot, shots = tmp_path / "book.png", tmp_path / "pages"
    problems = check_book(html, screenshot=shot, screenshot_dir=shots, chapters=book.book_pages(book.project_root(html)))
    # Only the deliberately broken chapter's error outputs: the figure page, the contents, the
    # links, the layout and the offline scripts (Quarto's jquery and requirejs) are sound.
    assert sorted(problems)[0] == "book/chapters/broken.html: error output: RuntimeError: an uncaught error", problems
    assert sorted(problems)[1].startswith("book/chapters/broken.html: shows 'Traceback' to the reader"), problems
    assert len(problems) == 2, problems
    figures = [p for p in html.rglob("*.png") if "site_libs" not in p.parts]
    assert figures, "the figure chapter rendered no image: the image check would be vacuous"
    assert any(f.name in (html / "book" / "chapters" / "figures.html").read_text() for f in figures)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert {"book-chapters-broken.png", "book-chapters-figures.png", "index.png"} <= {p.name for p in shots.iterdir()}
    # The interactive graph carries plotly.js itself (drawn offline: no problem reported for its page).
    interactive = (html / "book" / "chapters" / "interactive.html").read_text()
    assert "plotly-graph-div" in interactive and "plotly.js v" in interactive
    assert not re.search(r'<script[^>]*\ssrc="[^"]*plotly', interactive)  # no script tag loads it from elsewhere
    front = (html / "index.html").read_text()
    assert "profile default" in re.sub(r"<[^>]+>", "", front)  # {{< var profile >}} filled in
    if os.environ.get("C2SREPRO_SCREENSHOT_DIR"):
        target = Path(os.environ["C2SREPRO_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, target / f"toy-book-{renderer}.png")


def test_an_interactive_figure_that_is_not_drawn_is_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    page = html / "book" / "chapters" / "interactive.html"
    # plotly.js is the one inline script that starts with its licence banner: without it nothing draws.
    embedded = re.compile(r"<script[^>]*>\s*/\*\*\s*\* plotly\.js v.*?</script>", re.DOTALL)
    text = page.read_text()
    assert embedded.search(text), "the page does not embed plotly.js: the check below would be vacuous"
    page.write_text(embedded.sub('<script src="https://cdn.plot.ly/plotly-3.0.1.min.js"></script>', text, count=1))
    problems = "\n".join(check_book(html))
    assert "book/chapters/interactive.html: interactive figure plotly-" in problems and "was not drawn" in problems
    assert "book/chapters/interactive.html: loads plotly.js from https://cdn.plot.ly/plotly-3.0.1.min.js" in problems
    assert "book/chapters/figures.html" not in problems  # pages without a figure are not affected


def test_a_figure_drawn_outside_its_figure_is_found(rendered, tmp_path):
    renderer, toy_html = rendered
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    page = html / "book" / "chapters" / "interactive.html"
    text = page.read_text()
    # The defect Quarto made of an output carrying plotly.js and the figure together: the graph's
    # element and drawing script moved to the top of the body, the figure left with its caption.
    graph = re.search(r'<div id="plotly-\w+" class="plotly-graph-div".*?</div>\s*<script[^>]*>.*?</script>', text, re.DOTALL)
    assert graph, "no plotly figure on the page: the check below would be vacuous"
    text = text.replace(graph.group(0), "", 1)
    page.write_text(re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + graph.group(0), text, count=1))
    problems = "\n".join(check_book(html))
    assert re.search(r"book/chapters/interactive.html: interactive figure plotly-\w+ lies outside the page's content "
                     r"column", problems), problems
    if renderer == "quarto":  # Jupyter Book does not read Quarto's figure options: its pages have no <figure>
        assert ("book/chapters/interactive.html: figure 'Figure 4.1: The toy attribution graph, interactive.' has no "
                "content above its caption") in problems, problems
    assert "figures.html" not in problems  # the figure on the untouched page is in place
    # A figure's content drawn beyond the figure's box.
    figures = html / "book" / "chapters" / "figures.html"
    figures.write_text(re.sub(r"<img ", '<img style="position: relative; top: -400px" ', figures.read_text(), count=1))
    problems = "\n".join(check_book(html))
    if renderer == "quarto":
        assert "book/chapters/figures.html: figure 'Figure 2.1: A toy figure with a caption.': " \
               "its content (img) lies outside the figure" in problems, problems


def test_a_graph_node_opens_its_link_and_a_broken_one_is_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    page = html / "book" / "chapters" / "interactive.html"
    # A click on a node carrying a URL goes there (plotly's click event, as a reader's click fires it).
    click = """async () => {
      const gd = document.querySelector(".js-plotly-plot");
      const column = gd.layout.meta.click_opens;
      const row = gd.data.flatMap(t => t.customdata || []).find(c => c[column]);
      const point = {customdata: row.map((value, i) => i === column ? "#clicked-node" : value)};
      gd.emit("plotly_click", {points: [point], event: {}});
      await new Promise(resolve => setTimeout(resolve, 200));
      return [row[column], location.hash];
    }"""
    opened = open_page(html, "book/chapters/interactive.html", selector=".js-plotly-plot", evaluate=click)
    assert opened.count == 1 and opened.value == ["figures.html", "#clicked-node"], opened
    text = page.read_text()
    assert text.count('"figures.html"') > 0, "no node links to a card: the check below would be vacuous"
    page.write_text(text.replace('"figures.html"', '"figures.html#no-such-card"'))
    problems = "\n".join(check_book(html))
    assert "book/chapters/interactive.html: link to figures.html#no-such-card, which has no such anchor" in problems


def test_text_layout_and_anchor_problems_are_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    page = html / "book" / "chapters" / "figures.html"
    text = page.read_text()
    leaks = ('<p>UserWarning: a warning shown to the reader</p><p>looping: 3/3 [00:00, 9.1it/s]</p>'
             f'<p>read from {tmp_path}/checkout/results</p>'
             '<div style="width: 3000px">a table too wide for the page</div>'
             '<a href="figures.html#fig-nowhere">a broken cross-reference</a>')
    page.write_text(text.replace("</main>", leaks + "</main>", 1) if "</main>" in text
                    else text.replace("</body>", leaks + "</body>", 1))
    problems = "\n".join(check_book(html, forbidden_paths=[tmp_path / "checkout"]))
    assert "book/chapters/figures.html: shows 'Warning' to the reader" in problems
    assert "book/chapters/figures.html: shows 'it/s]' to the reader" in problems
    assert f"book/chapters/figures.html: shows the absolute path {tmp_path / 'checkout'}" in problems
    assert "book/chapters/figures.html: is wider than the viewport" in problems
    assert "link to figures.html#fig-nowhere, which has no such anchor" in problems
    assert "index.html" not in problems  # the untouched pages stay sound


def test_an_image_wider_than_its_column_is_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    page = html / "book" / "chapters" / "figures.html"
    page.write_text(re.sub(r"<img ", '<img style="width: 1100px; max-width: none" ', page.read_text(), count=1))
    problems = "\n".join(check_book(html))
    assert "book/chapters/figures.html: image" in problems and "is wider than its column" in problems


def test_broken_figures_links_and_contents_are_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    for figure in [p for p in html.rglob("*.png") if "site_libs" not in p.parts]:
        figure.write_bytes(b"not a png")  # present but undecodable: naturalWidth stays 0
    (html / "book" / "chapters" / "broken.html").unlink()  # its contents entry now points nowhere
    page = html / "book" / "chapters" / "figures.html"
    page.write_text(re.sub(r"(<h1[^>]*>)", r"\1Heading {.unnumbered} ", page.read_text(), count=1))
    orphan = html / "orphan.html"
    orphan.write_text("<html><body><h1>Not in the contents</h1></body></html>")
    problems = check_book(html, chapters=["index.qmd", "book/chapters/figures.ipynb", "book/chapters/broken.ipynb"])
    text = "\n".join(problems)
    assert "book/chapters/broken.html: chapter book/chapters/broken.ipynb has no rendered page" in text
    assert "book/chapters/figures.html: image" in text and "did not load (naturalWidth 0)" in text
    assert "link to missing file" in text and "broken.html" in text
    assert "book/chapters/figures.html: heading shows raw Quarto attributes" in text
    assert "orphan.html: not listed in the table of contents of index.html" in text
    assert "error output" not in text  # the broken page is gone
