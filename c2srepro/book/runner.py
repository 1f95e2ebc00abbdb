"""The book runner: execute the chapters under a parameter profile, then render the book.

1. The chapter list is read from ``_quarto.yml`` (``book.chapters``), the one table of contents.
2. Each notebook chapter is executed with papermill into ``results/<profile>/book/`` with its
   parameters resolved in order: the notebook's own defaults (the ``default`` profile), then
   ``chapters/profiles/<profile>.yml`` (``all:`` then ``chapters: {name: ...}``), then
   ``--set key=value`` / ``--set chapter.key=value``. Every override is checked against the
   declared parameters before any chapter runs: unknown names, values of another type (from the
   default, or the annotation ``cell: "Union[int, str]" = ...``) and values out of the declared
   range are errors. A range opens the parameter's comment: ``top_k = 64  # in [1, inf); ...``
   (an interval, ``[``/``]`` closed, ``(``/``)`` open, ``inf`` unbounded) or
   ``positions = "all"  # in {"all", "genes"}; ...`` (the allowed values); None passes a range.
   ``results_dir`` is passed relative to the checkout (chapters run there), so no page shows
   the machine's paths.
3. An executed notebook is cleaned for reading (``clean_executed_notebook``): every stderr
   output (warnings, logging, progress bars) moves to ``<chapter>.log`` beside it, empty outputs
   are dropped, and papermill's injected parameters cell is labelled and shown unfolded. It is
   moved into place only when it ran to the end; a failed one is kept as ``*.failed.ipynb`` and
   its error (exception, message, last frames) is raised with the notebook's path.
   A chapter's results count only when it succeeds (``chapter_journal``): before it runs,
   ``results/<profile>/`` is saved by hard links (small files copied) into ``.journal/``; when it
   fails, or the runner was killed during it, the saved results are put back (the book folder and
   the resumable folders, ``stages.RESUMABLE_DIRECTORIES``, are kept as they are), so no
   half-written file is left for a later chapter.
4. The book's front matter: ``_quarto.yml``, the bibliography and stylesheets of the checkout's
   root, and ``_variables.yml`` (profile, package versions, commit) that ``index.qmd`` reads
   with Quarto's ``{{< var name >}}``.
5. Rendering: ``quarto render`` of that folder when Quarto is on PATH (notebooks are not
   re-executed), otherwise a static HTML book built by Jupyter Book 1 from the same executed
   notebooks, with its table of contents generated from ``_quarto.yml`` and the variables
   substituted into the Markdown.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import yaml

log = logging.getLogger("c2srepro.book")

QUARTO_FILE = "_quarto.yml"
PROFILE_DIR = Path("chapters") / "profiles"
RUNNER_PARAMETERS = ("profile", "results_dir")
VARIABLES_FILE = "_variables.yml"
JOURNAL = ".journal"
JOURNAL_RECORD = "journal.json"
# A chapter may write a small file in place (a figure's savefig), which would change a hard link
# too: those are copied. Large files come from c2srepro's atomic writers (a new file each time).
JOURNAL_COPY_BELOW = 8 << 20
FRONT_MATTER_SUFFIXES = {".bib", ".css", ".scss"}
VERSIONED_PACKAGES = ("c2srepro", "torch", "transformers", "scanpy", "anndata", "gseapy", "papermill")
INJECTED_COMMENT = "# This run's values: the profile and --set overrides (the book runner's)"
ANNOTATION_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
                    "None": type(None)}
# The range that opens a parameter's comment (papermill's "help"): no "=" (papermill skips a
# line with two), so an interval or a set literal, then "; " and the description.
RANGE = re.compile(r"in\s+(?P<range>[\[(][^;]*[\])]|\{[^;]*\})\s*(?:;|$)")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
QUARTO_VARIABLE = re.compile(r"\{\{<\s*var\s+([\w.-]+)\s*>\}\}")
QUARTO_HEADING_ATTRIBUTES = re.compile(r"[ \t]*\{[.#][^}\n]*\}[ \t]*$", re.MULTILINE)


def project_root(start: str | os.PathLike = ".") -> Path:
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if (folder / QUARTO_FILE).is_file():
            return folder
    raise FileNotFoundError(f"no {QUARTO_FILE} in {Path(start).resolve()} or above: run from the c2srepro checkout")


def book_config(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / QUARTO_FILE).read_text())


def chapter_files(root: Path) -> list[str]:
    """Chapter paths in book order (chapters, then appendices), flattening Quarto ``part:`` groups."""

    def walk(entries: Iterable[Any]) -> Iterable[str]:
        for entry in entries:
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict):
                if "part" in entry and isinstance(entry["part"], str) and entry["part"].endswith((".qmd", ".md")):
                    yield entry["part"]
                yield from walk(entry.get("chapters", []))

    book = book_config(root)["book"]
    return list(walk([*book["chapters"], *book.get("appendices", [])]))


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
        value = parse_value(raw)
        chapter, _, param = key.rpartition(".")
        if param in RUNNER_PARAMETERS:
            raise ValueError(f"--set {item!r}: {param} is set by the runner (use --profile; results go to "
                             "results/<profile>/)")
        if chapter:
            if chapter not in names:
                raise ValueError(f"--set {item!r}: no chapter {chapter!r}; chapters: {sorted(names)}")
            overrides["chapters"].setdefault(chapter, {})[param] = value
        else:
            overrides["all"][param] = value
    return overrides


def parse_value(raw: str) -> Any:
    """A ``--set`` value as YAML, except that numbers in scientific notation (``1e-4``, which
    YAML 1.1 reads as a string) are numbers."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


def declared_parameters(root: Path, chapters: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each notebook chapter's parameters and their default values, as its parameters cell sets them."""
    import papermill

    declared = {}
    for chapter in chapters:
        if chapter.endswith(".ipynb"):
            found = papermill.inspect_notebook(str(root / chapter))
            declared[chapter_name(chapter)] = {
                name: Parameter(_literal(info["default"]), _annotation(info["inferred_type_name"]),
                                parse_range(info["help"], where=f"{chapter_name(chapter)}.{name}"))
                for name, info in found.items()}
    return declared


class Interval(NamedTuple):
    low: float
    high: float
    closed_low: bool
    closed_high: bool

    def __contains__(self, value: Any) -> bool:
        above = value >= self.low if self.closed_low else value > self.low
        below = value <= self.high if self.closed_high else value < self.high
        return above and below

    def __str__(self) -> str:
        def bound(x: float) -> str:
            return str(int(x)) if math.isfinite(x) and x == int(x) else str(x)

        return f"{'[' if self.closed_low else '('}{bound(self.low)}, {bound(self.high)}{']' if self.closed_high else ')'}"


class Parameter(NamedTuple):
    default: Any
    types: tuple[type, ...] | None  # from an annotation: ``cell: "Union[int, str]" = "CD14+ Monocyte"``
    allowed: Interval | frozenset | None = None  # from the comment: ``# in [1, inf); ...``


def parse_range(help_text: str, *, where: str) -> Interval | frozenset | None:
    """The range opening a parameter's comment (``in [0, 1)``, ``in (0, inf)``, ``in {"a", "b"}``), or None."""
    match = RANGE.match(help_text.strip())
    if not match:
        return None
    text = match.group("range")
    if text.startswith("{"):
        try:
            values = ast.literal_eval(text)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{where}: range {text!r} is not a set of literals such as {{\"a\", \"b\"}}") from error
        return frozenset(values)
    bounds = [b.strip() for b in text[1:-1].split(",")]
    try:
        low, high = (float(b) for b in bounds)
    except ValueError as error:
        raise ValueError(f"{where}: range {text!r} is not an interval such as [1, inf) or (0, 1]") from error
    if low > high:
        raise ValueError(f"{where}: range {text!r} is empty")
    return Interval(low, high, text[0] == "[", text[-1] == "]")


def _annotation(text: str) -> tuple[type, ...] | None:
    if text in ("None", ""):  # papermill's word for "not annotated"
        return None
    # papermill reads ``name: "Union[int, str]" = ...`` (a string, so the cell runs without imports)
    inner = re.fullmatch(r"(?:Union|Optional)\[(.*)\]", text.strip())
    names = [part.strip() for part in (inner.group(1) if inner else text).replace("|", ",").split(",")]
    if text.strip().startswith("Optional["):
        names.append("None")
    unknown = [n for n in names if n not in ANNOTATION_TYPES]
    if unknown:
        raise ValueError(f"parameter annotation {text!r}: unknown type(s) {unknown}; use {sorted(ANNOTATION_TYPES)}")
    return tuple(ANNOTATION_TYPES[n] for n in names)


def _literal(source: str) -> Any:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None  # an expression: any value is accepted


def check_overrides(layers: list[dict[str, Any]], declared: dict[str, dict[str, Any]]) -> None:
    """Refuse, before any chapter runs, a parameter no chapter declares, a value of another type
    than the chapter's default (an int for an int, a number for a float, ...; a None default takes
    any) or a value out of the declared range."""
    everywhere = {name for params in declared.values() for name in params}
    for layer in layers:
        unknown = set(layer["all"]) - everywhere
        if unknown:
            raise ValueError(f"parameter(s) {sorted(unknown)} are declared by no chapter; known: {sorted(everywhere)}")
        for chapter, params in declared.items():
            own = layer["chapters"].get(chapter, {})
            unknown = set(own) - set(params)
            if unknown:
                raise ValueError(f"chapter {chapter!r} has no parameter(s) {sorted(unknown)}; it declares {sorted(params)}")
            for name, value in {**{k: v for k, v in layer["all"].items() if k in params}, **own}.items():
                default, types, allowed = params[name]
                if types is not None or default is not None:
                    kinds = types or (type(default),)
                    if not any(_same_kind(value, kind) for kind in kinds):
                        expected = " | ".join("None" if k is type(None) else k.__name__ for k in kinds)
                        raise ValueError(f"{chapter}.{name}={value!r}: expected {expected} (the chapter's default is "
                                         f"{default!r}), got {type(value).__name__}")
                if not _in_range(value, allowed):
                    shown = "{" + ", ".join(sorted(map(repr, allowed))) + "}" if isinstance(allowed, frozenset) else allowed
                    raise ValueError(f"{chapter}.{name}={value!r}: out of range, the chapter allows {shown}")


def _in_range(value: Any, allowed: Interval | frozenset | None) -> bool:
    if allowed is None or value is None:
        return True
    if isinstance(allowed, frozenset):
        return value in allowed
    # An interval bounds numbers; another type the annotation allows (a label beside an index) passes.
    return not isinstance(value, (int, float)) or isinstance(value, bool) or value in allowed


def _same_kind(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def resolve_parameters(declared: Iterable[str], name: str, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge parameter layers for one chapter, keeping only parameters the chapter declares
    (``check_overrides`` has refused unknown names before any chapter runs)."""
    declared = set(declared)
    params: dict[str, Any] = {}
    for layer in layers:
        params.update({k: v for k, v in layer["all"].items() if k in declared})
        params.update({k: v for k, v in layer["chapters"].get(name, {}).items() if k in declared})
    return params


def execute_chapters(
    root: Path, profile: str, *, overrides: list[str] = (), only: list[str] | None = None
) -> Path:
    import papermill

    chapters = chapter_files(root)
    layers = [load_profile(root, profile), parse_overrides(overrides, chapters)]
    declared_by_chapter = declared_parameters(root, chapters)
    check_overrides(layers, declared_by_chapter)
    out_root = root / "results" / profile / "book"
    notebooks = [c for c in chapters if c.endswith(".ipynb")]
    if only:
        missing = set(only) - {chapter_name(c) for c in notebooks}
        if missing:
            raise ValueError(f"no notebook chapter(s) {sorted(missing)}; chapters: {[chapter_name(c) for c in notebooks]}")
        notebooks = [c for c in notebooks if chapter_name(c) in only]
    for chapter in notebooks:
        source = root / chapter
        declared = declared_by_chapter[chapter_name(chapter)].keys()
        params = resolve_parameters(declared, chapter_name(chapter), layers)
        params.update({"profile": profile, "results_dir": f"results/{profile}"})
        params = {k: v for k, v in params.items() if k in declared}
        target = out_root / chapter
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.ipynb")
        failed = target.with_suffix(".failed.ipynb")
        log.info("executing %s with %s", chapter, params)
        try:
            with chapter_journal(root / params["results_dir"], chapter):
                papermill.execute_notebook(
                    str(source), str(partial), parameters=params, cwd=str(root), kernel_name="python3",
                    progress_bar=False, log_output=True,
                )
        except JournalError:
            raise
        except Exception as error:  # papermill raises its own types and the kernel's
            try:
                if partial.exists():
                    os.replace(partial, failed)
            except OSError as move_error:  # a read-only or full disk: report the chapter's error still
                failed = f"{partial} (not renamed: {move_error.strerror})"
            raise RuntimeError(
                f"chapter {chapter} failed under profile {profile!r}:\n{chapter_error(error)}\n"
                f"the executed notebook with the error is {failed}"
            ) from error
        clean_executed_notebook(partial, log_path=target.with_suffix(".log"))
        os.replace(partial, target)
        failed.unlink(missing_ok=True)
    for chapter in chapters:
        if not chapter.endswith(".ipynb"):
            (out_root / chapter).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / chapter, out_root / chapter)
    for extra in [QUARTO_FILE, *sorted(p.name for p in root.iterdir() if p.suffix in FRONT_MATTER_SUFFIXES)]:
        shutil.copy2(root / extra, out_root / extra)
    (out_root / VARIABLES_FILE).write_text(yaml.safe_dump(book_variables(root, profile), sort_keys=False))
    return out_root


class JournalError(RuntimeError):
    """The results folder cannot be saved before a chapter runs (read-only, full)."""


@contextmanager
def chapter_journal(results: Path, chapter: str) -> Iterator[None]:
    """Run a block (a chapter) whose writes to ``results`` are undone if it fails (step 3)."""
    from c2srepro._cache import write_json_atomic

    restore_journal(results)
    journal = results / JOURNAL
    try:
        results.mkdir(parents=True, exist_ok=True)
        (journal / "saved").mkdir(parents=True)
        names = sorted(p.name for p in results.iterdir() if p.name not in _kept_names())
        for name in names:
            _save(results / name, journal / "saved" / name)
        # Written last: a journal without its record was never complete, and the results are untouched.
        write_json_atomic(journal / JOURNAL_RECORD, {"chapter": chapter, "names": names})
    except OSError as error:
        shutil.rmtree(journal, ignore_errors=True)
        raise JournalError(f"cannot save {results} before chapter {chapter} runs ({error.strerror or error}): "
                           "make the folder writable, or free space on its disk") from error
    try:
        yield
    except BaseException:
        restore_journal(results)
        raise
    shutil.rmtree(journal)


def restore_journal(results: Path) -> None:
    """Put back the results saved before a chapter that failed or was killed; idempotent, so a
    restore that is itself interrupted completes on the next start."""
    journal = results / JOURNAL
    record = journal / JOURNAL_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        names = set(saved["names"])
        log.warning("chapter %s did not finish: putting back the results it found in %s", saved["chapter"], results)
        for entry in results.iterdir():
            if entry.name not in names and entry.name not in _kept_names():
                _remove(entry)  # written by the chapter that failed
        for name in sorted(names):
            kept = journal / "saved" / name
            if kept.exists() or kept.is_symlink():
                _remove(results / name)
                os.replace(kept, results / name)
    shutil.rmtree(journal, ignore_errors=True)


def _kept_names() -> set[str]:
    from c2srepro.book.stages import RESUMABLE_DIRECTORIES

    return {"book", JOURNAL, *RESUMABLE_DIRECTORIES}


def _save(source: Path, target: Path) -> None:
    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).stat().st_size < JOURNAL_COPY_BELOW:
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link_or_copy(str(source), str(target))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def chapter_error(error: BaseException, *, frames: int = 6) -> str:
    """The failing cell's exception type, message and last traceback lines, as the terminal shows them."""
    ename, evalue = getattr(error, "ename", type(error).__name__), getattr(error, "evalue", str(error))
    traceback = [ANSI_ESCAPE.sub("", line) for line in getattr(error, "traceback", None) or []]
    lines = [line for chunk in traceback for line in chunk.splitlines() if line.strip(" -")]
    last = f"{ename}: {evalue}"
    if lines and lines[-1].strip() == last:
        lines.pop()
    return "\n".join([*("  " + line for line in lines[-frames:]), last])


def clean_executed_notebook(notebook_path: Path, *, log_path: Path) -> None:
    """Make an executed chapter fit for reading (step 3 of the module docstring).

    stderr carries what a reader should not see (warnings, logging, progress bars); it is kept in
    ``log_path``, cell by cell, since papermill already streamed it to the runner's log."""
    import nbformat

    notebook = nbformat.read(notebook_path, as_version=4)
    log_lines: list[str] = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.get("output_type") == "stream":
                if output.get("name") == "stderr":
                    log_lines.append(f"--- cell {number}\n{output.get('text', '')}")
                    continue
                if not output.get("text", "").strip():
                    continue
            if output.get("output_type") in ("display_data", "execute_result") and not output.get("data"):
                continue
            kept.append(output)
        cell.outputs = kept
        if "injected-parameters" in cell.metadata.get("tags", []):
            body = "\n".join(line for line in cell.source.splitlines() if line.strip() != "# Parameters")
            cell.source = f"#| code-fold: false\n{INJECTED_COMMENT}\n{body.strip()}\n"
    nbformat.write(notebook, notebook_path)
    log_path.write_text("".join(log_lines))


def book_variables(root: Path, profile: str) -> dict[str, str]:
    """What the front page says about this build: the profile, the versions, the commit."""
    from importlib.metadata import PackageNotFoundError, version

    variables = {"profile": profile, "python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            variables[package] = version(package)
        except PackageNotFoundError:
            variables[package] = "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    variables["commit"] = commit
    return variables


def render(book_dir: Path, *, renderer: str = "auto") -> Path:
    """Render executed chapters: Quarto when available, else Jupyter Book 1. Returns index.html."""
    quarto = shutil.which("quarto")
    if renderer == "quarto" or (renderer == "auto" and quarto):
        if not quarto:
            raise FileNotFoundError("quarto is not on PATH: install Quarto (https://quarto.org/docs/get-started/) "
                                    "or use --renderer jupyter-book")
        started = time.perf_counter()
        subprocess.run([quarto, "render", str(book_dir)], check=True)
        log.info("quarto rendered %s in %.0f s", book_dir, time.perf_counter() - started)
        return book_dir / book_config(book_dir)["project"].get("output-dir", "_book") / "index.html"
    return _render_jupyter_book(book_dir)


def substitute_variables(text: str, book_dir: Path) -> str:
    """Quarto's ``{{< var name >}}`` shortcodes, filled from the book's ``_variables.yml``."""
    path = book_dir / VARIABLES_FILE
    variables = yaml.safe_load(path.read_text()) if path.is_file() else {}

    def value(match: re.Match) -> str:
        if match.group(1) not in variables:
            raise ValueError(f"{{{{< var {match.group(1)} >}}}} is not in {path}; known: {sorted(variables)}")
        return str(variables[match.group(1)])

    return QUARTO_VARIABLE.sub(value, text)


def _render_jupyter_book(book_dir: Path) -> Path:
    config = book_config(book_dir)
    chapters = chapter_files(book_dir)
    toc_files = []
    for chapter in chapters:
        path = Path(chapter)
        if path.suffix == ".qmd":
            # Jupyter Book reads Markdown, not .qmd: drop Quarto's heading attributes ({.unnumbered}).
            text = substitute_variables(QUARTO_HEADING_ATTRIBUTES.sub("", (book_dir / path).read_text()), book_dir)
            (book_dir / path.with_suffix(".md")).write_text(text)
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
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book", description=__doc__.splitlines()[0])
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
    except (ValueError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as error:
        log.error("%s", error)
        return 1
    return 0

