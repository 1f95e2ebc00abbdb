import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from _toy_book import write_project
from c2srepro.book import runner as book

ROOT = Path(__file__).resolve().parents[1]


def test_chapters_come_from_quarto_yml():
    chapters = book.chapter_files(ROOT)
    assert chapters[0] == "index.qmd"
    assert "chapters/01-model.ipynb" in chapters
    for chapter in chapters:
        assert (ROOT / chapter).is_file(), chapter


def test_every_notebook_has_a_tagged_parameters_cell():
    import papermill

    for chapter in book.chapter_files(ROOT):
        if chapter.endswith(".ipynb"):
            declared = papermill.inspect_notebook(str(ROOT / chapter))
            assert {"profile", "results_dir"} <= set(declared), chapter


def test_part_groups_are_flattened(tmp_path):
    (tmp_path / "_quarto.yml").write_text(yaml.safe_dump({"c2srepro": {"chapters": [
        "index.qmd", {"part": "Model", "chapters": ["a.ipynb", "b.ipynb"]}, "c.ipynb"]}}))
    assert book.chapter_files(tmp_path) == ["index.qmd", "a.ipynb", "b.ipynb", "c.ipynb"]
    (tmp_path / "_quarto.yml").write_text(yaml.safe_dump({"book": {"chapters": ["index.qmd", "a.ipynb"]}}))
    with pytest.raises(ValueError, match="has no c2srepro: chapters: list"):
        book.chapter_files(tmp_path)


def test_parameter_layers_resolve_in_order():
    profile = {"all": {"seed": 1, "top_k": 32, "other": 5}, "chapters": {"01-model": {"top_k": 48}}}
    cli = book.parse_overrides(["seed=7", "01-model.mini_epochs=2"], ["chapters/01-model.ipynb"])
    params = book.resolve_parameters(["seed", "top_k", "mini_epochs"], "01-model", [profile, cli])
    assert params == {"seed": 7, "top_k": 48, "mini_epochs": 2}


def test_unknown_chapter_parameter_is_an_error():
    layer = {"all": {}, "chapters": {"01-model": {"topk": 3}}}
    with pytest.raises(ValueError, match="has no parameter.*topk"):
        book.check_overrides([layer], {"01-model": {"top_k": book.Parameter(64, None)}})


def test_bad_overrides_are_errors():
    with pytest.raises(ValueError, match="expected key=value"):
        book.parse_overrides(["seed"], ["chapters/01-model.ipynb"])
    with pytest.raises(ValueError, match="no chapter '02-nope'"):
        book.parse_overrides(["02-nope.k=1"], ["chapters/01-model.ipynb"])


def test_unknown_profile_is_an_error():
    with pytest.raises(ValueError, match="no parameter profile 'nope'.*default"):
        book.load_profile(ROOT, "nope")


def _toy_book(tmp_path, body: str) -> Path:
    (tmp_path / "chapters" / "profiles").mkdir(parents=True)
    (tmp_path / "chapters" / "profiles" / "default.yml").write_text("all: {}\nchapters: {}\n")
    (tmp_path / "index.qmd").write_text("# Toy\n\nA toy book, profile {{< var profile >}}.\n")
    write_project(tmp_path, ["index.qmd", "chapters/toy.ipynb"])
    notebook = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "default"\nresults_dir = "results/default"\nx = 1')
    params.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_markdown_cell("# Toy chapter"), params, nbformat.v4.new_code_cell(body)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "chapters" / "toy.ipynb")
    return tmp_path


def test_runner_executes_with_overrides_and_renders(tmp_path, capfd):
    root = _toy_book(tmp_path, "import json, logging, pathlib, sys, warnings\nfrom tqdm import tqdm\n"
                               "for _ in tqdm(range(3), desc='looping'): pass\n"
                               "warnings.warn('a deprecation nobody should read')\n"
                               "logging.getLogger('toy').warning('a log line')\n"
                               "import os; os.write(2, b'the kernel process writes to its stderr\\n')\n"
                               "print('')\n"
                               "pathlib.Path(results_dir).mkdir(parents=True, exist_ok=True)\n"
                               "pathlib.Path(results_dir, 'toy.json').write_text(json.dumps({'x': x, 'accuracy': 0.123456}))")
    out = book.execute_chapters(root, "default", overrides=["x=41"])
    assert json.loads((root / "results/default/toy.json").read_text()) == {"x": 41, "accuracy": 0.123456}
    # The terminal: the chapter's start and end with the numbers it wrote; nothing of the kernel's.
    terminal = capfd.readouterr()
    lines = terminal.out.splitlines()
    assert lines[1] == "toy: started (no earlier run)", lines
    assert re.fullmatch(r"toy: done in \d+ s; toy.json: x 41, accuracy 0.123", lines[2]), lines
    assert len(lines) == 3 and not terminal.err, terminal
    executed = nbformat.read(out / "chapters" / "toy.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    # Shown unfolded, explained, and with the checkout-relative results folder only.
    assert injected[0].source.startswith("#| code-fold: false\n# This run's values")
    assert 'results_dir = "results/default"' in injected[0].source and str(root) not in injected[0].source
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("name") == "stderr"], outputs  # warnings, logging, bars moved out
    assert not [o for o in outputs if o.get("output_type") == "stream" and not o.get("text", "").strip()]
    chapter_log = (out / "chapters" / "toy.log").read_text()
    for text in ("a deprecation nobody should read", "looping", "a log line", "the kernel process writes"):
        assert text in chapter_log, text
    index = book.render(root, "default", renderer="jupyter-book", overrides=["x=41"])
    assert index == root / "_book" / "default" / "index.html" and index.is_file()
    assert yaml.safe_load((root / "_variables.yml").read_text())["profile"] == "default"
    staged = yaml.safe_load((root / "book" / "_chapters.yml").read_text())
    assert staged == {"book": {"chapters": ["index.qmd", "book/chapters/toy.ipynb"]}}
    assert (root / "book" / "chapters" / "toy.ipynb").is_file() and not (root / "book" / "chapters" / "toy.log").exists()
    page = re.sub(r"<[^>]+>", "", (index.parent / "book" / "chapters" / "toy.html").read_text())
    assert "Toy chapter" in page and "x = 41" in page  # the injected parameters cell is shown
    assert "3/3" not in page and "100%" not in page  # progress bars are dropped from the pages
    assert "profile default" in re.sub(r"<[^>]+>", "", index.read_text())  # {{< var profile >}} filled in


def _two_chapter_book(tmp_path) -> Path:
    root = _toy_book(tmp_path, "import pathlib\npathlib.Path(results_dir).mkdir(parents=True, exist_ok=True)\n"
                               "pathlib.Path(results_dir, 'toy.txt').write_text(str(x))")
    second = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "default"\nresults_dir = "results/default"\ny = 1')
    params.metadata["tags"] = ["parameters"]
    second.cells = [nbformat.v4.new_markdown_cell("# Second"), params, nbformat.v4.new_code_cell(
        "import pathlib\nr = pathlib.Path(results_dir)\n"
        "(r / 'second.txt').write_text(str(y) + (r / 'toy.txt').read_text())\n"
        "n = int((r / 'runs.txt').read_text()) if (r / 'runs.txt').exists() else 0\n"
        "(r / 'runs.txt').write_text(str(n + 1))")]
    second.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(second, root / "chapters" / "second.ipynb")
    write_project(root, ["index.qmd", "chapters/toy.ipynb", "chapters/second.ipynb"])
    return root


def test_an_unchanged_chapter_is_reused_and_a_changed_one_reruns_with_those_after_it(tmp_path, capfd):
    root = _two_chapter_book(tmp_path)
    results = root / "results" / "default"
    book.execute_chapters(root, "default")
    capfd.readouterr()
    book.execute_chapters(root, "default")
    out = capfd.readouterr().out.splitlines()
    assert out[1:] == ["re-used, unchanged since their last run (parameters, code, inputs): toy, second"], out
    assert (results / "runs.txt").read_text() == "1"
    # The profile changes the first chapter's parameter: it reruns, and so does the chapter reading its results.
    (root / "chapters" / "profiles" / "default.yml").write_text("all: {}\nchapters: {toy: {x: 5}}\n")
    book.execute_chapters(root, "default")
    out = capfd.readouterr().out.splitlines()
    assert out[1] == "toy: started (parameters changed: x 1 -> 5)", out
    assert out[3] == "second: started (results of an earlier chapter changed)", out
    assert (results / "second.txt").read_text() == "15" and (results / "runs.txt").read_text() == "2"
    # A later chapter's own parameter: the first is re-used, the second reruns.
    (root / "chapters" / "profiles" / "default.yml").write_text("all: {}\nchapters: {toy: {x: 5}, second: {y: 2}}\n")
    book.execute_chapters(root, "default")
    out = capfd.readouterr().out.splitlines()
    assert out[1:3] == ["re-used, unchanged since their last run (parameters, code, inputs): toy",
                        "second: started (parameters changed: y 1 -> 2)"], out
    # A chapter whose rerun writes the same results leaves the chapters after it re-used.
    notebook = nbformat.read(root / "chapters" / "toy.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("# a comment: the same results"))
    nbformat.write(notebook, root / "chapters" / "toy.ipynb")
    book.execute_chapters(root, "default")
    out = capfd.readouterr().out.splitlines()
    assert out[1] == "toy: started (its notebook or c2srepro's code changed)", out
    assert out[3:] == ["re-used, unchanged since their last run (parameters, code, inputs): second"], out
    # A result deleted by hand: its chapter reruns.
    (results / "second.txt").unlink()
    book.execute_chapters(root, "default")
    out = capfd.readouterr().out.splitlines()
    assert out[2] == "second: started (its results are missing (second.txt))", out
    assert (results / "runs.txt").read_text() == "4"


def test_the_book_profile_comes_from_quartos(tmp_path):
    (tmp_path / "chapters" / "profiles").mkdir(parents=True)
    for name in ("default", "smoke"):
        (tmp_path / "chapters" / "profiles" / f"{name}.yml").write_text("all: {}\n")
    assert book.book_profile(tmp_path, "") == "default"
    assert book.book_profile(tmp_path, "smoke") == "smoke"
    assert book.book_profile(tmp_path, "smoke,print") == "smoke"  # a Quarto-only profile beside it
    with pytest.raises(ValueError, match=r"Quarto profile\(s\) \['print'\] name 0 book profiles: name exactly one of "
                                         r"\['default', 'smoke'\] \(quarto render --profile smoke\)"):
        book.book_profile(tmp_path, "print")
    with pytest.raises(ValueError, match="name 2 book profiles"):
        book.book_profile(tmp_path, "default,smoke")


def test_every_book_profile_has_its_quarto_profile():
    for profile in sorted((ROOT / book.PROFILE_DIR).glob("*.yml")):
        assert book.output_dir(ROOT, profile.stem) == ROOT / "_book" / profile.stem, profile.name


def test_failed_chapter_leaves_no_executed_notebook(tmp_path):
    root = _toy_book(tmp_path, "raise RuntimeError('boom')")
    with pytest.raises(RuntimeError, match="chapter chapters/toy.ipynb failed") as raised:
        book.execute_chapters(root, "default")
    # The terminal shows the failing cell's exception and source line, and where the notebook is.
    message = str(raised.value)
    assert "RuntimeError: boom" in message and "raise RuntimeError('boom')" in message
    assert message.rstrip().endswith("toy.failed.ipynb")
    assert "boom" in (root / "results" / "default" / "book" / "chapters" / "toy.log").read_text()
    out = root / "results" / "default" / "book" / "chapters"
    assert not (out / "toy.ipynb").exists()
    assert (out / "toy.failed.ipynb").exists()


def test_papermill_sees_every_parameter_the_cell_assigns():
    import ast

    import papermill

    for chapter in book.chapter_files(ROOT):
        if not chapter.endswith(".ipynb"):
            continue
        notebook = nbformat.read(ROOT / chapter, as_version=4)
        (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        body = ast.parse(cell.source).body
        assigned = {t.id for node in body if isinstance(node, ast.Assign) for t in node.targets}
        assigned |= {node.target.id for node in body if isinstance(node, ast.AnnAssign)}
        assert assigned == set(papermill.inspect_notebook(str(ROOT / chapter))), chapter


def test_front_page_variables_are_filled_for_the_fallback(tmp_path):
    (tmp_path / "_variables.yml").write_text("profile: smoke\ntorch: 2.13.0\n")
    text = book.substitute_variables("Rendered with {{< var profile >}} (torch {{< var torch >}}).", tmp_path)
    assert text == "Rendered with smoke (torch 2.13.0)."
    with pytest.raises(ValueError, match=r"var python >}} is not in .*_variables.yml; known: \['profile', 'torch'\]"):
        book.substitute_variables("{{< var python >}}", tmp_path)


def test_overrides_are_checked_before_any_chapter_runs(tmp_path):
    root = _toy_book(tmp_path, "import pathlib\npathlib.Path('ran').write_text('yes')")
    for item, message in [
        ("sed=1", r"parameter\(s\) \['sed'\] are declared by no chapter"),
        ("toy.y=1", r"chapter 'toy' has no parameter\(s\) \['y'\]"),
        ("x=2.5", r"toy.x=2.5: expected int \(the chapter's default is 1\), got float"),
        ("x=none", r"toy.x='none': expected int"),
        ("results_dir=/x", r"results_dir is set by the runner"),
        ("profile=o", r"profile is set by the runner"),
    ]:
        with pytest.raises(ValueError, match=message):
            book.execute_chapters(root, "default", overrides=[item], only=["toy"])
        assert not (root / "ran").exists()  # nothing ran


def test_scientific_notation_is_a_number():
    assert book.parse_value("1e-4") == 1e-4 and book.parse_value("-2.5E3") == -2500.0
    assert book.parse_value("1e") == "1e" and book.parse_value("0.5") == 0.5 and book.parse_value("[1, 2]") == [1, 2]


def test_an_annotated_parameter_takes_each_of_its_types():
    declared = {"06-circuit": {"cell": book.Parameter("CD14+ Monocyte", book._annotation("Union[int, str]")),
                               "fdr": book.Parameter(0.05, None), "target_feature": book.Parameter(None, None)}}
    for ok in (["06-circuit.cell=3"], ["06-circuit.cell=B cell"], ["fdr=1"], ["fdr=1e-3"], ["target_feature=[1]"]):
        book.check_overrides([book.parse_overrides(ok, ["chapters/06-circuit.ipynb"])], declared)
    with pytest.raises(ValueError, match=r"06-circuit.cell=\[1\]: expected int \| str"):
        book.check_overrides([book.parse_overrides(["06-circuit.cell=[1]"], ["chapters/06-circuit.ipynb"])], declared)
    with pytest.raises(ValueError, match="unknown type"):
        book._annotation("Path")


def test_declared_ranges_refuse_out_of_range_overrides_before_any_chapter_runs():
    chapters = book.chapter_files(ROOT)
    declared = book.declared_parameters(ROOT, chapters)
    for item, message in [
        ("03-validation.max_accuracy_cells=0", r"03-validation.max_accuracy_cells=0: out of range, the chapter allows \[1, inf\)"),
        ("01-model.example_cell=-1", r"01-model.example_cell=-1: out of range, the chapter allows \[0, inf\)"),
        ("01-model.heldout_fraction=1", r"heldout_fraction=1: out of range, the chapter allows \(0, 1\)"),
        ("04-features.layer=-2", r"04-features.layer=-2: out of range"),
        ("04-features.positions=tokens", r"positions='tokens': out of range, the chapter allows \{'all', 'genes', 'prompt'\}"),
        ("02-transcoders.lr=0", r"02-transcoders.lr=0: out of range, the chapter allows \(0, inf\)"),
        ("top_k=2.5", r"01-model.top_k=2.5: expected int"),
        ("top_k=0", r"01-model.top_k=0: out of range"),
    ]:
        with pytest.raises(ValueError, match=message):
            book.check_overrides([book.parse_overrides([item], chapters)], declared)
    for ok in ("03-validation.max_accuracy_cells=1", "04-features.layer=null", "02-transcoders.lr=1e-4", "fdr=1"):
        book.check_overrides([book.parse_overrides([ok], chapters)], declared)


def test_every_default_and_profile_lies_in_its_declared_range():
    chapters = book.chapter_files(ROOT)
    declared = book.declared_parameters(ROOT, chapters)
    defaults = {"all": {}, "chapters": {c: {n: p.default for n, p in ps.items()} for c, ps in declared.items()}}
    book.check_overrides([defaults], declared)
    for profile in sorted((ROOT / book.PROFILE_DIR).glob("*.yml")):
        book.check_overrides([book.load_profile(ROOT, profile.stem)], declared)
    assert sum(p.allowed is not None for ps in declared.values() for p in ps.values()) >= 25


def test_range_syntax():
    assert book.parse_range("in [1, inf); genes per cell", where="x") == book.Interval(1, math.inf, True, False)
    assert 0.5 in book.parse_range("in (0, 1]", where="x") and 0 not in book.parse_range("in (0, 1]", where="x")
    assert book.parse_range('in {"a", "b"}; the mode', where="x") == frozenset({"a", "b"})
    assert book.parse_range("None: every held-out cell", where="x") is None
    index_or_label = {"06-circuit": {"cell": book.Parameter("B", book._annotation("Union[int, str]"),
                                                            book.parse_range("in [0, inf); an index or a label", where="x"))}}
    for ok in ("06-circuit.cell=3", "06-circuit.cell=CD14+ Monocyte"):  # an interval bounds the numbers only
        book.check_overrides([book.parse_overrides([ok], ["chapters/06-circuit.ipynb"])], index_or_label)
    with pytest.raises(ValueError, match=r"06-circuit.cell=-1: out of range"):
        book.check_overrides([book.parse_overrides(["06-circuit.cell=-1"], ["chapters/06-circuit.ipynb"])], index_or_label)
    assert book.parse_range("in the paper: 1.4e-4", where="x") is None  # a description, not a range
    with pytest.raises(ValueError, match=r"c.k: range '\[a, 1\]' is not an interval"):
        book.parse_range("in [a, 1]", where="c.k")
    with pytest.raises(ValueError, match="is empty"):
        book.parse_range("in [2, 1]", where="c.k")


def test_a_failed_chapter_leaves_the_results_it_found(tmp_path):
    root = _toy_book(tmp_path, "import os, pathlib\n"
                               "r = pathlib.Path(results_dir)\n"
                               "(r / 'model.json').write_text('{\"heldout_accuracy\": NaN')\n"  # half-written, in place
                               "(r / 'new.json').write_text('{}')\n"
                               "(r / 'transcoders' / 'layer_09').mkdir(parents=True)\n"
                               "(r / 'activations').mkdir(exist_ok=True)\n"
                               "(r / 'activations' / 'shard-1').write_text('resumable')\n"
                               "if x == 1: raise RuntimeError('boom')\n")
    results = root / "results" / "default"
    (results / "transcoders" / "layer_00").mkdir(parents=True)
    big = results / "transcoders" / "layer_00" / "w.bin"
    big.write_bytes(b"w" * (book.JOURNAL_COPY_BELOW + 1))  # saved by a hard link
    (results / "model.json").write_text('{"heldout_accuracy": 0.9}')
    with pytest.raises(RuntimeError, match="RuntimeError: boom"):
        book.execute_chapters(root, "default")
    assert json.loads((results / "model.json").read_text()) == {"heldout_accuracy": 0.9}
    assert sorted(p.name for p in results.iterdir()) == ["activations", "book", "model.json", "transcoders"]
    assert sorted(p.name for p in (results / "transcoders").iterdir()) == ["layer_00"] and big.stat().st_size > 8 << 20
    assert (results / "activations" / "shard-1").read_text() == "resumable"  # kept for the rerun to resume
    assert (results / "book" / "chapters" / "toy.failed.ipynb").is_file()
    book.execute_chapters(root, "default", overrides=["x=2"])  # a chapter that succeeds keeps what it wrote
    assert (results / "new.json").is_file() and not (results / book.JOURNAL).exists()
    assert (results / "model.json").read_text().startswith('{"heldout_accuracy": NaN')


def test_results_of_a_killed_chapter_are_put_back_on_the_next_start(tmp_path):
    import os
    import subprocess
    import sys

    root = _toy_book(tmp_path, "import pathlib\npathlib.Path(results_dir, 'ran').write_text(str(x))")
    results = root / "results" / "default"
    results.mkdir(parents=True)
    (results / "table.csv").write_text("old")
    killed = (f"import os, signal, pathlib\nfrom c2srepro.book.runner import chapter_journal\n"
              f"r = pathlib.Path({str(results)!r})\n"
              "with chapter_journal(r, 'chapters/toy.ipynb'):\n"
              "    (r / 'table.csv').write_text('half')\n"  # in place, as a figure's savefig writes
              "    (r / 'stray.json').write_text('{')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", killed], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -9 and (results / "table.csv").read_text() == "half"  # as kill -9 left it
    book.execute_chapters(root, "default")  # the next start puts the results back, then runs
    assert (results / "table.csv").read_text() == "old" and not (results / "stray.json").exists()
    assert (results / "ran").read_text() == "1" and not (results / book.JOURNAL).exists()


def test_a_results_folder_that_cannot_be_saved_stops_before_the_chapter(tmp_path, monkeypatch):
    import errno
    import os

    root = _toy_book(tmp_path, "import pathlib\npathlib.Path('ran').write_text('yes')")
    results = root / "results" / "default"
    results.mkdir(parents=True)
    (results / "model.json").write_text("{}")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(book.shutil, "copy2", full)
    with pytest.raises(book.JournalError, match=r"cannot save .*results/default before chapter chapters/toy.ipynb runs "
                                                r"\(No space left on device\): make the folder writable, or free space"):
        book.execute_chapters(root, "default")
    assert not (root / "ran").exists() and not (results / book.JOURNAL).exists()


def test_a_progress_bar_becomes_the_terminals_one_progress_line():
    from c2srepro.book.terminal import progress_line

    refreshes = ("training mini-C2S:  48%|████▊     | 408/840 [02:24<02:15,  3.19it/s, epoch=11]\r"
                 "training mini-C2S:  49%|████▊     | 409/840 [02:24<02:15,  3.19it/s, epoch=11, loss=1.082]")
    assert progress_line(refreshes) == ("    training mini-C2S [#########...........]  49% 409/840, 02:24 elapsed, "
                                        "02:15 left")  # the last refresh
    assert progress_line("100%|██████████| 3/3 [00:00<00:00]").startswith("    working [####################] 100% 3/3")
    assert progress_line("UserWarning: the order of those genes will be arbitrary") is None
