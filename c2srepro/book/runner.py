"""The book runner: execute the chapters under a parameter profile, then render the book.

1. The chapter list is read from ``_quarto.yml`` (``book.chapters``), the one table of contents.
2. Each notebook chapter is executed with papermill into ``results/<profile>/book/`` with its
   parameters resolved in order: the notebook's own defaults (the ``default`` profile), then
   ``chapters/profiles/<profile>.yml`` (``all:`` then ``chapters: {name: ...}``), then
   ``--set key=value`` / ``--set chapter.key=value``. Unknown parameter names are an error.
   An executed notebook is moved into place only when it ran to the end, without its progress
   bars (they stay in the runner's log); a failed one is kept beside it as ``*.failed.ipynb``.
3. Rendering: ``quarto render`` of that folder when Quarto is on PATH (notebooks are not
   re-executed), otherwise a static HTML book built by Jupyter Book 1 from the same executed
   notebooks, with its table of contents generated from ``_quarto.yml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger("c2srepro.book")

QUARTO_FILE = "_quarto.yml"
PROFILE_DIR = Path("chapters") / "profiles"
RUNNER_PARAMETERS = ("profile", "results_dir")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")
QUARTO_HEADING_ATTRIBUTES = re.compile(r"[ \t]*\{[.#][^}\n]*\}[ \t]*$", re.MULTILINE)


def project_root(start: str | os.PathLike = ".") -> Path:
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if (folder / QUARTO_FILE).is_file():
            return folder
    raise FileNotFoundError(f"no {QUARTO_FILE} in {Path(start).resolve()} or above: run from the c2srepro checkout")


def book_config(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / QUARTO_FILE).read_text())


def chapter_files(root: Path) -> list[str]:
    """Chapter paths in book order, flattening Quarto ``part:`` groups."""

    def walk(entries: Iterable[Any]) -> Iterable[str]:
        for entry in entries:
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict):
                if "part" in entry and isinstance(entry["part"], str) and entry["part"].endswith((".qmd", ".md")):
                    yield entry["part"]
                yield from walk(entry.get("chapters", []))

    return list(walk(book_config(root)["book"]["chapters"]))


def chapter_name(path: str) -> str:
    return Path(path).stem


def load_profile(root: Path, profile: str) -> dict[str, Any]:
    path = root / PROFILE_DIR / f"{profile}.yml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yml"))
        raise ValueError(f"no parameter profile {profile!r} ({path}); known profiles: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"all", "chapters"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; use 'all' and 'chapters'")
    return {"all": data.get("all") or {}, "chapters": data.get("chapters") or {}}


def parse_overrides(items: Iterable[str], chapters: list[str]) -> dict[str, Any]:
    """``key=value`` (every chapter) or ``chapter.key=value``; values parsed as YAML."""
    names = {chapter_name(c) for c in chapters}
    overrides: dict[str, Any] = {"all": {}, "chapters": {}}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value or chapter.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        chapter, _, param = key.rpartition(".")
        if chapter:
            if chapter not in names:
                raise ValueError(f"--set {item!r}: no chapter {chapter!r}; chapters: {sorted(names)}")
            overrides["chapters"].setdefault(chapter, {})[param] = value
        else:
            overrides["all"][param] = value
    return overrides


def resolve_parameters(
    declared: Iterable[str], name: str, layers: list[dict[str, Any]], *, strict_chapter: bool = True
) -> dict[str, Any]:
    """Merge parameter layers for one chapter, keeping only parameters the chapter declares."""
    declared = set(declared)
    params: dict[str, Any] = {}
    for layer in layers:
        params.update({k: v for k, v in layer["all"].items() if k in declared})
        own = layer["chapters"].get(name, {})
        unknown = set(own) - declared
        if unknown and strict_chapter:
            raise ValueError(
                f"chapter {name!r} has no parameter(s) {sorted(unknown)}; it declares {sorted(declared)}"
            )
        params.update(own)
    return params


def execute_chapters(
    root: Path, profile: str, *, overrides: list[str] = (), only: list[str] | None = None
) -> Path:
    import papermill

    chapters = chapter_files(root)
    layers = [load_profile(root, profile), parse_overrides(overrides, chapters)]
    all_keys = {k for layer in layers for k in layer["all"]}
    out_root = root / "results" / profile / "book"
    notebooks = [c for c in chapters if c.endswith(".ipynb")]
    if only:
        missing = set(only) - {chapter_name(c) for c in notebooks}
        if missing:
            raise ValueError(f"no notebook chapter(s) {sorted(missing)}; chapters: {[chapter_name(c) for c in notebooks]}")
        notebooks = [c for c in notebooks if chapter_name(c) in only]
    declared_anywhere: set[str] = set()
    for chapter in notebooks:
        source = root / chapter
        declared = papermill.inspect_notebook(str(source)).keys()
        declared_anywhere |= set(declared)
        params = resolve_parameters(declared, chapter_name(chapter), layers)
        params.update({"profile": profile, "results_dir": str(root / "results" / profile)})
        params = {k: v for k, v in params.items() if k in declared}
        target = out_root / chapter
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.ipynb")
        log.info("executing %s with %s", chapter, params)
        try:
            papermill.execute_notebook(
                str(source), str(partial), parameters=params, cwd=str(root), kernel_name="python3",
                progress_bar=False, log_output=True,
            )
        except Exception as error:  # papermill raises its own types and the kernel's
            os.replace(partial, target.with_suffix(".failed.ipynb"))
            raise RuntimeError(
                f"chapter {chapter} failed under profile {profile!r}; the executed notebook with the "
                f"error is {target.with_suffix('.failed.ipynb')}"
            ) from error
        drop_progress_bars(partial)
        os.replace(partial, target)
        target.with_suffix(".failed.ipynb").unlink(missing_ok=True)
    unused = all_keys - declared_anywhere - set(RUNNER_PARAMETERS)
    if unused and not only:
        raise ValueError(f"parameter(s) {sorted(unused)} are declared by no chapter")
    for chapter in chapters:
        if not chapter.endswith(".ipynb"):
            (out_root / chapter).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / chapter, out_root / chapter)
    shutil.copy2(root / QUARTO_FILE, out_root / QUARTO_FILE)
    return out_root


def drop_progress_bars(notebook_path: Path) -> None:
    """Remove progress-bar output (tqdm's stderr lines) from an executed notebook: the runner's log
    shows the bars while chapters run; on the book's pages they would be noise."""
    import nbformat

    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                o for o in cell.outputs
                if not (o.get("output_type") == "stream" and o.get("name") == "stderr" and PROGRESS_BAR.search(o.get("text", "")))
            ]
    nbformat.write(notebook, notebook_path)


def render(book_dir: Path, *, renderer: str = "auto") -> Path:
    """Render executed chapters: Quarto when available, else Jupyter Book 1. Returns index.html."""
    quarto = shutil.which("quarto")
    if renderer == "quarto" or (renderer == "auto" and quarto):
        if not quarto:
            raise FileNotFoundError("quarto is not on PATH: install Quarto or use --renderer jupyter-book")
        subprocess.run([quarto, "render", str(book_dir)], check=True)
        return book_dir / book_config(book_dir)["project"].get("output-dir", "_book") / "index.html"
    return _render_jupyter_book(book_dir)


def _render_jupyter_book(book_dir: Path) -> Path:
    config = book_config(book_dir)
    chapters = chapter_files(book_dir)
    toc_files = []
    for chapter in chapters:
        path = Path(chapter)
        if path.suffix == ".qmd":
            # Jupyter Book reads Markdown, not .qmd: drop Quarto's heading attributes ({.unnumbered}).
            text = (book_dir / path).read_text()
            (book_dir / path.with_suffix(".md")).write_text(QUARTO_HEADING_ATTRIBUTES.sub("", text))
        toc_files.append(str(path.with_suffix("")))
    toc = {"format": "jb-book", "root": toc_files[0], "chapters": [{"file": f} for f in toc_files[1:]]}
    jb_config = {
        "title": config["book"].get("title", "c2srepro"),
        "author": config["book"].get("author", ""),
        "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},
        "sphinx": {"config": {"html_show_copyright": False, "suppress_warnings": ["myst.header"]}},
    }
    (book_dir / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (book_dir / "_config.yml").write_text(yaml.safe_dump(jb_config, sort_keys=False))
    executable = Path(sys.executable).parent / "jupyter-book"
    if not executable.exists():
        raise FileNotFoundError(
            "neither quarto nor jupyter-book is installed: `pip install 'jupyter-book<2'` "
            "(or install Quarto) to render the executed chapters"
        )
    subprocess.run([str(executable), "build", "--quiet", str(book_dir)], check=True)
    return book_dir / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book.runner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the chapters and render the book")
    run.add_argument("--profile", default="default")
    run.add_argument("--chapters", nargs="*", help="chapter names to execute (default: all)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CHAPTER.]KEY=VALUE")
    run.add_argument("--renderer", choices=["auto", "quarto", "jupyter-book", "none"], default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = project_root()
    try:
        book_dir = execute_chapters(root, args.profile, overrides=args.overrides, only=args.chapters)
        if args.renderer != "none":
            index = render(book_dir, renderer=args.renderer)
            log.info("book rendered: %s", index)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        log.error("%s", error)
        return 1
    return 0

