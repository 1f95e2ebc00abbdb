"""The book runner: execute the chapters under a parameter profile, then render the book.

``quarto render`` at the checkout's root is the book's command: its pre-render step
(``c2srepro/book/quarto_prerender.py``, :func:`pre_render`) runs steps 1-4 for the active Quarto
profile (``quarto render --profile smoke``; ``default`` otherwise), then Quarto renders (step 5).

1. The chapter list is read from ``_quarto.yml`` (``c2srepro: chapters / appendices``: the source
   notebooks, the one table of contents).
2. Each notebook chapter's parameters resolve in order: the notebook's own defaults (the
   ``default`` profile), then ``chapters/profiles/<profile>.yml`` (``all:`` then ``chapters:
   {name: ...}``), then ``--set key=value`` / ``--set chapter.key=value``. Every override is
   checked against the declared parameters before any chapter runs: unknown names, values of
   another type (from the default, or the annotation ``cell: "Union[int, str]" = ...``) and values
   out of the declared range are errors, and so is a ``device`` this machine lacks (``device:
   cuda`` without CUDA: ``check_devices``). A range opens the parameter's comment:
   ``top_k = 64  # in [1, inf); ...`` (an interval, ``[``/``]`` closed, ``(``/``)`` open, ``inf``
   unbounded) or ``positions = "all"  # in {"all", "genes"}; ...`` (the allowed values); None
   passes a range. ``results_dir`` is passed relative to the checkout (chapters run there), so no
   page shows the machine's paths.
3. A chapter runs again only when something it depends on changed since its last run under the
   profile, as ``results/<profile>/book/runs.json`` records it: its parameters, its notebook or
   c2srepro's code, or the results of the chapters before it (the sha256 of each file a chapter
   wrote in ``results/<profile>/``); re-used chapters are named in one line. A chapter that runs is
   executed with papermill into ``results/<profile>/book/`` and cleaned for reading
   (``clean_executed_notebook``: stderr outputs, already in ``<chapter>.log`` beside it, and empty
   outputs are dropped; papermill's injected parameters cell is labelled and shown unfolded); the
   terminal shows its start, its progress bar and its end (:mod:`c2srepro.book.terminal`). It is
   moved into place only when it ran to the end; a failed one is kept as ``*.failed.ipynb`` and
   its error (exception, message, last frames) is raised with the notebook's path.
   A chapter's results count only when it succeeds (``chapter_journal``): before it runs,
   ``results/<profile>/`` is saved by hard links (small files copied) into ``.journal/``; when it
   fails, or the runner was killed during it, the saved results are put back (the book folder and
   the resumable folders, ``stages.RESUMABLE_DIRECTORIES``, are kept as they are), so no
   half-written file is left for a later chapter.
4. Staging (``stage_book``): the profile's executed chapters are copied into ``book/`` at the root
   (``book/chapters/01-model.ipynb``), with ``book/_chapters.yml`` (the table of contents naming
   those copies, which ``_quarto.yml`` merges as a metadata file) and ``_variables.yml`` (profile,
   package versions, commit) that ``index.qmd`` reads with Quarto's ``{{< var name >}}``.
5. Rendering: Quarto renders the staged notebooks (they are not re-executed) into the profile's
   ``output-dir`` (``_quarto-<profile>.yml``: ``_book/<profile>/``). Without Quarto, Jupyter Book 1
   builds the same staged chapters into the same folder, its table of contents generated from
   ``_quarto.yml`` and the variables substituted into the Markdown.
"""

from __future__ import annotations

import argparse
import ast
import csv
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
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import yaml

from c2srepro.book.terminal import ChapterStream, Terminal, capture, terminal_stream

log = logging.getLogger("c2srepro.book")

QUARTO_FILE = "_quarto.yml"
PROFILE_DIR = Path("chapters") / "profiles"
RUNNER_PARAMETERS = ("profile", "results_dir")
VARIABLES_FILE = "_variables.yml"
TOC_KEY = "c2srepro"
STAGE = Path("book")
STAGED_TOC = STAGE / "_chapters.yml"
STAGED_TOC_HEADER = "# Written by the book's pre-render (c2srepro.book.runner.stage_book) for the profile last rendered.\n"
# Not staged: the chapter's log and the notebooks of a failed or unfinished run.
STAGE_SKIPS = (".log", ".failed.ipynb", ".partial.ipynb")
RUN_RECORD = "runs.json"
# c2srepro's modules that run and check the book, which no chapter imports (code_fingerprint).
BOOK_TOOLS = ("book/runner.py", "book/terminal.py", "book/browser.py", "book/quarto_prerender.py", "book/__main__.py")
FALLBACK_DIR = "jupyter-book"
# How `python -m c2srepro.book run` hands --set and --chapters to the pre-render that quarto render starts.
SET_ENV = "C2SREPRO_BOOK_SET"
CHAPTERS_ENV = "C2SREPRO_BOOK_CHAPTERS"
JOURNAL = ".journal"
JOURNAL_RECORD = "journal.json"
# A chapter may write a small file in place (a figure's savefig), which would change a hard link
# too: those are copied. Large files come from c2srepro's atomic writers (a new file each time).
JOURNAL_COPY_BELOW = 8 << 20
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
    """Chapter sources in book order (chapters, then appendices), flattening Quarto ``part:`` groups."""

    def walk(entries: Iterable[Any]) -> Iterable[str]:
        for entry in entries:
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict):
                if "part" in entry and isinstance(entry["part"], str) and entry["part"].endswith((".qmd", ".md")):
                    yield entry["part"]
                yield from walk(entry.get("chapters", []))

    toc = book_config(root).get(TOC_KEY) or {}
    if not toc.get("chapters"):
        raise ValueError(f"{root / QUARTO_FILE} has no {TOC_KEY}: chapters: list (the book's chapters as source "
                         "notebooks, in order)")
    return list(walk([*toc["chapters"], *toc.get("appendices", [])]))


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


def check_devices(layers: list[dict[str, Any]], declared: dict[str, dict[str, Any]], *, sources: list[str]) -> None:
    """Refuse, before any chapter runs, a ``device`` this machine lacks (``device: cuda`` without
    CUDA), naming the chapters it reaches, where it was set (``sources``: one name per layer, the
    profile's file and ``--set``) and the fix. None passes: each chapter then picks cuda when
    available, else cpu (``c2srepro._device``)."""
    from c2srepro._device import FIX, device_problem

    refused: dict[tuple[str, str], list[str]] = {}  # (where it was set, problem) -> chapters
    for chapter, params in declared.items():
        if "device" not in params:
            continue
        value, where = params["device"].default, f"the {chapter} notebook's default"
        for layer, source in zip(layers, sources):
            for scope in ("all", chapter):
                values = layer["all"] if scope == "all" else layer["chapters"].get(chapter, {})
                if "device" in values:
                    value = values["device"]
                    if source == "--set":
                        where = f"--set {'' if scope == 'all' else chapter + '.'}device={value}"
                    else:
                        where = f"{source} under {'all:' if scope == 'all' else f'chapters: {chapter}:'}"
        problem = device_problem(value)
        if problem is not None:
            refused.setdefault((f"{where} sets device={str(value)!r}", problem), []).append(chapter)
    if refused:
        raise ValueError("; ".join(f"{where} for chapter(s) {', '.join(chapters)}, but {problem}"
                                   for (where, problem), chapters in refused.items()) + f": {FIX}")


def resolve_parameters(declared: Iterable[str], name: str, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge parameter layers for one chapter, keeping only parameters the chapter declares
    (``check_overrides`` has refused unknown names before any chapter runs)."""
    declared = set(declared)
    params: dict[str, Any] = {}
    for layer in layers:
        params.update({k: v for k, v in layer["all"].items() if k in declared})
        params.update({k: v for k, v in layer["chapters"].get(name, {}).items() if k in declared})
    return params


def checked_parameters(
    root: Path, profile: str, overrides: Iterable[str] = ()
) -> tuple[list[str], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The chapters, the profile's and ``--set``'s parameter layers and each chapter's declared
    parameters, every override checked (``check_overrides``, ``check_devices``) before any work."""
    chapters = chapter_files(root)
    layers = [load_profile(root, profile), parse_overrides(overrides, chapters)]
    declared = declared_parameters(root, chapters)
    check_overrides(layers, declared)
    check_devices(layers, declared, sources=[f"profile {profile!r} ({PROFILE_DIR / profile}.yml)", "--set"])
    return chapters, layers, declared


def execute_chapters(
    root: Path, profile: str, *, overrides: Iterable[str] = (), only: list[str] | None = None,
    terminal: Terminal | None = None,
) -> Path:
    """Execute the notebook chapters that changed since their last run under ``profile`` (step 3);
    returns ``results/<profile>/book``. ``only``: execute these chapters (by name) and no other."""
    import papermill

    from c2srepro._cache import sha256_file, short_hash, write_json_atomic

    terminal = terminal or Terminal()
    chapters, layers, declared_by_chapter = checked_parameters(root, profile, overrides)
    results = root / "results" / profile
    out_root = results / "book"
    notebooks = [c for c in chapters if c.endswith(".ipynb")]
    if only:
        missing = set(only) - {chapter_name(c) for c in notebooks}
        if missing:
            raise ValueError(f"no notebook chapter(s) {sorted(missing)}; chapters: {[chapter_name(c) for c in notebooks]}")
    record_path = out_root / RUN_RECORD
    runs = json.loads(record_path.read_text()) if record_path.is_file() else {}
    code = code_fingerprint()
    terminal.line(f"c2srepro book, profile {profile}: {len(notebooks)} notebook chapter(s); results in results/{profile}/, "
                  f"each chapter's log beside its executed notebook in results/{profile}/book/")
    reused: list[str] = []

    def report_reused() -> None:
        if reused:
            terminal.line(f"re-used, unchanged since their last run (parameters, code, inputs): {', '.join(reused)}")
            reused.clear()

    for index, chapter in enumerate(notebooks):
        name = chapter_name(chapter)
        if only and name not in only:
            continue
        declared = declared_by_chapter[name].keys()
        params = resolve_parameters(declared, name, layers)
        params.update({"profile": profile, "results_dir": f"results/{profile}"})
        params = {k: v for k, v in params.items() if k in declared}
        wanted = {"parameters": params, "code": short_hash([sha256_file(root / chapter), code]),
                  "inputs": short_hash([runs.get(chapter_name(c), {}).get("outputs", {}) for c in notebooks[:index]])}
        target = out_root / chapter
        defaults = {k: p.default for k, p in declared_by_chapter[name].items()}
        why = "asked for by name" if only else _why_execute(runs.get(name), wanted, target, results, defaults)
        if why is None:
            reused.append(name)
            continue
        report_reused()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.ipynb")
        failed = target.with_suffix(".failed.ipynb")
        log_path = target.with_suffix(".log")
        terminal.line(f"{name}: started ({why})")
        before = _snapshot(results)
        started, cpu = time.perf_counter(), _children_cpu()
        try:
            with chapter_journal(results, chapter), capture(log_path, terminal) as chapter_log, kernel_path(root):
                log.info("executing %s with %s", chapter, params)
                papermill.execute_notebook(
                    str(root / chapter), str(partial), parameters=params, cwd=str(root), kernel_name="python3",
                    progress_bar=False, log_output=False, stdout_file=chapter_log,
                    stderr_file=ChapterStream(chapter_log, terminal),
                )
        except JournalError:
            raise
        except Exception as error:  # papermill raises its own types and the kernel's
            with open(log_path, "a") as chapter_log:
                chapter_log.write(f"\n{chapter_error(error, frames=40)}\n")
            try:
                if partial.exists():
                    os.replace(partial, failed)
            except OSError as move_error:  # a read-only or full disk: report the chapter's error still
                failed = f"{partial} (not renamed: {move_error.strerror})"
            terminal.line(f"{name}: failed after {time.perf_counter() - started:.0f} s (its log: "
                          f"{log_path.relative_to(root)})")
            raise RuntimeError(
                f"chapter {chapter} failed under profile {profile!r}:\n{chapter_error(error)}\n"
                f"the executed notebook with the error is {failed}"
            ) from error
        seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
        clean_executed_notebook(partial)
        os.replace(partial, target)
        failed.unlink(missing_ok=True)
        after = _snapshot(results)
        written = sorted(path for path, stat in after.items() if before.get(path) != stat)
        runs[name] = {**wanted, "outputs": {path: sha256_file(results / path) for path in written},
                      "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
        write_json_atomic(record_path, runs)
        numbers = numbers_written(results, written)
        terminal.line(f"{name}: done in {seconds:.0f} s" + (f"; {numbers}" if numbers else ""))
    report_reused()
    return out_root


@contextmanager
def kernel_path(root: Path) -> Iterator[None]:
    """Chapters' kernels import the checkout's c2srepro (the code ``code_fingerprint`` names), not
    another copy installed in the environment."""
    saved = os.environ.get("PYTHONPATH")
    if (root / "c2srepro" / "__init__.py").is_file():
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *([saved] if saved else [])])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _why_execute(record: dict[str, Any] | None, wanted: dict[str, Any], target: Path, results: Path,
                 defaults: dict[str, Any]) -> str | None:
    """Why a chapter must run again (its last run's ``record`` against what it would run with now),
    or None. ``defaults``: the notebook's own values, for a parameter the profile does not set."""
    if record is None or not target.is_file():
        return "no earlier run"
    if record["parameters"] != wanted["parameters"]:
        old, new = {**defaults, **record["parameters"]}, {**defaults, **wanted["parameters"]}
        changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return "parameters changed: " + ", ".join(changed)
    if record["code"] != wanted["code"]:
        return "its notebook or c2srepro's code changed"
    if record["inputs"] != wanted["inputs"]:
        return "results of an earlier chapter changed"
    gone = [path for path in record.get("outputs", {}) if not (results / path).exists()]
    if gone:
        return f"its results are missing ({', '.join(gone[:3])})"
    return None


def code_fingerprint() -> str:
    """A fingerprint of the c2srepro code that chapters run: the package but the modules that run
    and check the book (``BOOK_TOOLS``), which change no chapter's results."""
    import c2srepro
    from c2srepro._cache import sha256_file, short_hash

    package = Path(c2srepro.__file__).parent
    return short_hash({p.relative_to(package).as_posix(): sha256_file(p) for p in sorted(package.rglob("*.py"))
                       if p.relative_to(package).as_posix() not in BOOK_TOOLS})


def _children_cpu() -> float:
    """CPU seconds (user and system) of this process's finished children: the chapters' kernels."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _snapshot(results: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of each result file (the book folder, the journal and the
    resumable folders aside): what a chapter wrote is what changed across its run."""
    found = {}
    if results.is_dir():
        for entry in results.iterdir():
            if entry.name in _kept_names():
                continue
            for path in [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file()):
                stat = path.stat()
                found[path.relative_to(results).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def numbers_written(results: Path, written: Iterable[str], *, per_file: int = 4) -> str:
    """What a chapter wrote, for its terminal line: the top-level numbers of its JSON results and
    the rows of its CSV tables (files at the top of ``results``; provenance records aside)."""
    shown = []
    for path in written:
        if "/" in path or path.endswith(".provenance.json"):
            continue
        try:
            if path.endswith(".csv"):
                with open(results / path, newline="") as table:
                    shown.append(f"{path}: {max(sum(1 for _ in csv.reader(table)) - 1, 0)} rows")
                continue
            if not path.endswith(".json"):
                continue
            data = json.loads((results / path).read_text())
        except (OSError, ValueError):
            continue
        numbers = [f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                   for key, value in data.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if numbers:
            shown.append(f"{path}: {', '.join(numbers[:per_file])}")
    return "; ".join(shown)


def staged(chapter: str) -> str:
    """Where Quarto reads a chapter: a notebook's executed copy in ``book/``, another file as it is."""
    return (STAGE / chapter).as_posix() if chapter.endswith(".ipynb") else chapter


def book_pages(root: Path) -> list[str]:
    """The book's chapters as the rendered book holds them (``index.qmd``, ``book/chapters/01-model.ipynb``)."""
    return [staged(chapter) for chapter in chapter_files(root)]


def stage_book(root: Path, profile: str, *, into: Path | None = None) -> Path:
    """Put the profile's executed chapters where the book reads them (step 4): ``<into>/book/``
    mirrors the chapters' folders of ``results/<profile>/book/`` (logs and failed runs aside), and
    ``<into>/book/_chapters.yml`` is the table of contents with those copies. ``into``: the checkout."""
    from c2srepro._cache import atomic_path

    into = root if into is None else into
    out_root = root / "results" / profile / "book"
    chapters = chapter_files(root)
    missing = [c for c in chapters if c.endswith(".ipynb") and not (out_root / c).is_file()]
    if missing:
        raise FileNotFoundError(f"chapter(s) {[chapter_name(c) for c in missing]} have not run under profile "
                                f"{profile!r}: run them (quarto render --profile {profile})")
    for folder in sorted({Path(c).parent for c in chapters if c.endswith(".ipynb")}):
        source, target = out_root / folder, into / STAGE / folder
        wanted = {p.name for p in source.iterdir() if p.is_file() and not p.name.endswith(STAGE_SKIPS)}
        target.mkdir(parents=True, exist_ok=True)
        for old in target.iterdir():
            if old.is_file() and old.name not in wanted:
                old.unlink()
        for name in sorted(wanted):
            kept, new = target / name, source / name
            if not kept.is_file() or (kept.stat().st_size, kept.stat().st_mtime_ns) != (new.stat().st_size,
                                                                                       new.stat().st_mtime_ns):
                with atomic_path(kept) as tmp:
                    shutil.copy2(new, tmp)
    toc = book_config(root)[TOC_KEY]
    book = {"chapters": _staged_entries(toc["chapters"])}
    if toc.get("appendices"):
        book["appendices"] = _staged_entries(toc["appendices"])
    with atomic_path(into / STAGED_TOC) as tmp:
        tmp.write_text(STAGED_TOC_HEADER + yaml.safe_dump({"book": book}, sort_keys=False))
    with atomic_path(into / VARIABLES_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(book_variables(root, profile), sort_keys=False))
    return into / STAGE


def _staged_entries(entries: list[Any]) -> list[Any]:
    return [staged(e) if isinstance(e, str) else {**e, "chapters": _staged_entries(e.get("chapters", []))}
            for e in entries]


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


def clean_executed_notebook(notebook_path: Path) -> None:
    """Make an executed chapter fit for reading (step 3 of the module docstring): stderr outputs
    (warnings, logging, progress bars) are dropped, since they were streamed into the chapter's log
    as it ran; empty outputs go too; the injected parameters cell is labelled and shown unfolded."""
    import nbformat

    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.get("output_type") == "stream" and (output.get("name") == "stderr"
                                                          or not output.get("text", "").strip()):
                continue
            if output.get("output_type") in ("display_data", "execute_result") and not output.get("data"):
                continue
            kept.append(output)
        cell.outputs = kept
        if "injected-parameters" in cell.metadata.get("tags", []):
            body = "\n".join(line for line in cell.source.splitlines() if line.strip() != "# Parameters")
            cell.source = f"#| code-fold: false\n{INJECTED_COMMENT}\n{body.strip()}\n"
    nbformat.write(notebook, notebook_path)


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


def output_dir(root: Path, profile: str) -> Path:
    """Where the rendered book of ``profile`` goes: ``project: output-dir`` of ``_quarto-<profile>.yml``,
    else of ``_quarto.yml``, else Quarto's ``_book``."""
    for name in (f"_quarto-{profile}.yml", QUARTO_FILE):
        path = root / name
        folder = ((yaml.safe_load(path.read_text()) or {}).get("project") or {}).get("output-dir") if path.is_file() else None
        if folder:
            return root / folder
    return root / "_book"


def render(root: Path, profile: str, *, renderer: str = "auto", overrides: Iterable[str] = (),
           only: list[str] | None = None, terminal: Terminal | None = None) -> Path:
    """The book of ``profile``, executed and rendered; returns its index.html (step 5).

    ``quarto``: ``quarto render --profile <profile>`` at the root, whose pre-render executes the
    chapters (``overrides`` and ``only`` reach it through the environment). ``jupyter-book``: the
    chapters executed here, then the static fallback. ``none``: executed and staged only."""
    quarto = shutil.which("quarto")
    if renderer == "auto":
        renderer = "quarto" if quarto else "jupyter-book"
    if renderer == "quarto":
        if not quarto:
            raise FileNotFoundError("quarto is not on PATH: install Quarto (https://quarto.org/docs/get-started/) "
                                    "or use --renderer jupyter-book")
        checked_parameters(root, profile, overrides)  # refused here, once, before Quarto starts
        env = {**os.environ, SET_ENV: json.dumps(list(overrides)), CHAPTERS_ENV: json.dumps(only)}
        env.setdefault("QUARTO_PYTHON", sys.executable)
        subprocess.run([quarto, "render", "--profile", profile], cwd=root, env=env, check=True)
        return output_dir(root, profile) / "index.html"
    execute_chapters(root, profile, overrides=overrides, only=only, terminal=terminal)
    stage_book(root, profile)
    return output_dir(root, profile) / "index.html" if renderer == "none" else _render_jupyter_book(root, profile)


def pre_render(environ: Mapping[str, str] = os.environ) -> int:
    """Quarto's pre-render step (``_quarto.yml``): execute the chapters of the active Quarto profile
    that changed and stage them for Quarto. Returns the exit status."""
    terminal = Terminal(terminal_stream())
    try:
        root = project_root()
        profile = book_profile(root, environ.get("QUARTO_PROFILE", ""))
        execute_chapters(root, profile, overrides=json.loads(environ.get(SET_ENV) or "[]"),
                         only=json.loads(environ.get(CHAPTERS_ENV) or "null"), terminal=terminal)
        stage_book(root, profile)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        terminal.line(f"ERROR: {error}")
        return 1
    return 0


def book_profile(root: Path, quarto_profile: str) -> str:
    """The book profile among Quarto's active profiles (``QUARTO_PROFILE``, comma-separated):
    the one with a ``chapters/profiles/<name>.yml``; ``default`` when none is active."""
    names = [name for name in re.split(r"[ ,]+", quarto_profile) if name]
    known = sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yml"))
    books = [name for name in names if name in known]
    if not names:
        return "default"
    if len(books) != 1:
        raise ValueError(f"Quarto profile(s) {names} name {len(books)} book profiles: name exactly one of {known} "
                         "(quarto render --profile smoke)")
    return books[0]


def substitute_variables(text: str, book_dir: Path) -> str:
    """Quarto's ``{{< var name >}}`` shortcodes, filled from the book's ``_variables.yml``."""
    path = book_dir / VARIABLES_FILE
    variables = yaml.safe_load(path.read_text()) if path.is_file() else {}

    def value(match: re.Match) -> str:
        if match.group(1) not in variables:
            raise ValueError(f"{{{{< var {match.group(1)} >}}}} is not in {path}; known: {sorted(variables)}")
        return str(variables[match.group(1)])

    return QUARTO_VARIABLE.sub(value, text)


def _render_jupyter_book(root: Path, profile: str) -> Path:
    """The static fallback: Jupyter Book 1 builds the staged chapters in ``results/<profile>/book/
    jupyter-book/``; the HTML replaces the profile's output folder."""
    source = root / "results" / profile / "book" / FALLBACK_DIR
    stage_book(root, profile, into=source)
    config = book_config(root)
    toc_files = []
    for chapter in book_pages(root):
        path = Path(chapter)
        if path.suffix == ".qmd":
            # Jupyter Book reads Markdown, not .qmd: drop Quarto's heading attributes ({.unnumbered}).
            text = substitute_variables(QUARTO_HEADING_ATTRIBUTES.sub("", (root / path).read_text()), source)
            (source / path.with_suffix(".md")).parent.mkdir(parents=True, exist_ok=True)
            (source / path.with_suffix(".md")).write_text(text)
        toc_files.append(path.with_suffix("").as_posix())
    toc = {"format": "jb-book", "root": toc_files[0], "chapters": [{"file": f} for f in toc_files[1:]]}
    jb_config = {
        "title": config["book"].get("title", "c2srepro"),
        "author": config["book"].get("author", ""),
        "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},
        "sphinx": {"config": {"html_show_copyright": False, "suppress_warnings": ["myst.header"]}},
    }
    (source / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (source / "_config.yml").write_text(yaml.safe_dump(jb_config, sort_keys=False))
    executable = Path(sys.executable).parent / "jupyter-book"
    if not executable.exists():
        raise FileNotFoundError(
            "neither quarto nor jupyter-book is installed: `pip install 'jupyter-book<2'` "
            "(or install Quarto) to render the executed chapters"
        )
    subprocess.run([str(executable), "build", "--quiet", str(source)], check=True, stdout=subprocess.DEVNULL)
    html, target = source / "_build" / "html", output_dir(root, profile)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(html, target)
    return target / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the chapters that changed and render the book")
    run.add_argument("--profile", default="default")
    run.add_argument("--chapters", nargs="*", help="chapter names to execute (default: those that changed)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CHAPTER.]KEY=VALUE")
    run.add_argument("--renderer", choices=["auto", "quarto", "jupyter-book", "none"], default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("c2srepro").setLevel(logging.INFO)
    root = project_root()
    try:
        if args.renderer == "auto" and shutil.which("quarto") is None:
            log.info("quarto is not on PATH: rendering the Jupyter Book fallback")
        index = render(root, args.profile, renderer=args.renderer, overrides=args.overrides, only=args.chapters)
        if args.renderer != "none":
            log.info("book rendered: %s", index.relative_to(root))
    except (ValueError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as error:
        log.error("%s", error)
        return 1
    return 0
