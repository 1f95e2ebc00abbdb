"""The rendered book in real headless Chromium (Playwright): figures load, no error cells, contents resolve."""

import os
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from c2srepro.book import runner as book
from c2srepro.book.browser import check_book, find_chromium

FIGURE_CELL = """\
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2], [scale * v for v in (0, 1, 4)], marker="o")
ax.set(title="toy figure", xlabel="x", ylabel="y")
plt.show()"""
TABLE_CELL = 'pd.DataFrame({"layer": [0, 1], "fraction": [0.5 * scale, 0.75]})'
# A chapter that runs to the end (papermill stops on a raised error) yet shows a traceback on stderr.
STDERR_TRACEBACK_CELL = """\
import traceback
try:
    raise ValueError("caught and printed")
except ValueError:
    traceback.print_exc()"""


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


def _render(root: Path, chapters: dict[str, tuple[str, list]]) -> Path:
    """A toy book executed by the book runner and rendered by Jupyter Book; returns its HTML folder."""
    (root / "chapters" / "profiles").mkdir(parents=True)
    (root / "chapters" / "profiles" / "default.yml").write_text("all: {}\nchapters: {}\n")
    (root / "index.qmd").write_text("# Toy book\n\nA toy book for the browser check.\n")
    (root / "_quarto.yml").write_text(yaml.safe_dump({"project": {"type": "book"}, "book": {
        "title": "Toy", "chapters": ["index.qmd", *(f"chapters/{name}.ipynb" for name in chapters)]}}))
    for name, (title, cells) in chapters.items():
        _notebook(root / "chapters" / f"{name}.ipynb", title, cells)
    out = book.execute_chapters(root, "default", overrides=["scale=2.0"])
    if "broken" in chapters:
        # An error output as a kernel writes it, which papermill would refuse to leave in a chapter:
        # the check must still catch it in a book rendered from other notebooks.
        executed = nbformat.read(out / "chapters" / "broken.ipynb", as_version=4)
        executed.cells[-1].outputs.append(nbformat.v4.new_output(
            "error", ename="RuntimeError", evalue="an uncaught error",
            traceback=["Traceback (most recent call last):", "RuntimeError: an uncaught error"]))
        nbformat.write(executed, out / "chapters" / "broken.ipynb")
    return book.render(out, renderer="jupyter-book").parent


@pytest.fixture(scope="module")
def toy_html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toybook")
    return _render(root, {
        "figures": ("Figures and tables", [(FIGURE_CELL, []), (TABLE_CELL, [])]),
        "broken": ("A chapter with errors", [(STDERR_TRACEBACK_CELL, [])]),
    })


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


def test_rendered_book_in_chromium(toy_html, tmp_path):
    shot = tmp_path / "book.png"
    problems = check_book(toy_html, screenshot=shot, chapters=book.chapter_files(toy_html.parents[1]))
    # Only the deliberately broken chapter's two error outputs: the figure page, the contents and
    # the links are sound.
    assert sorted(problems) == [
        "chapters/broken.html: error output: RuntimeError: an uncaught error",
        "chapters/broken.html: error output: ValueError: caught and printed",
    ], problems
    figures = list((toy_html / "_images").glob("*.png"))
    assert figures, "the figure chapter rendered no image: the image check would be vacuous"
    assert figures[0].name in (toy_html / "chapters" / "figures.html").read_text()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("C2SREPRO_SCREENSHOT_DIR"):
        target = Path(os.environ["C2SREPRO_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, target / "toy-book.png")


def test_broken_figures_links_and_contents_are_found(toy_html, tmp_path):
    html = tmp_path / "html"
    shutil.copytree(toy_html, html)
    for figure in (html / "_images").glob("*.png"):
        figure.write_bytes(b"not a png")  # present but undecodable: naturalWidth stays 0
    (html / "chapters" / "broken.html").unlink()  # its contents entry now points nowhere
    page = html / "chapters" / "figures.html"
    page.write_text(page.read_text().replace("<h1>", "<h1>Heading {.unnumbered} ", 1))
    orphan = html / "orphan.html"
    orphan.write_text("<html><body><h1>Not in the contents</h1></body></html>")
    problems = check_book(html, chapters=["index.qmd", "chapters/figures.ipynb", "chapters/broken.ipynb"])
    text = "\n".join(problems)
    assert "chapters/broken.html: chapter chapters/broken.ipynb has no rendered page" in text
    assert "chapters/figures.html: image" in text and "did not load (naturalWidth 0)" in text
    assert "link to missing file" in text and "broken.html" in text
    assert "chapters/figures.html: heading shows raw Quarto attributes" in text
    assert "orphan.html: not listed in the table of contents of index.html" in text
    assert "error output" not in text  # the broken page is gone
