"""`import c2srepro as c2s`: the flow's names, loaded on first use, none from the book."""

import subprocess
import sys

import pytest

import c2srepro as c2s


def test_every_front_door_name_resolves_to_a_library_object():
    for name in c2s.__all__:
        value = getattr(c2s, name)
        assert callable(value), name
        assert not value.__module__.startswith("c2srepro.book"), f"{name} comes from the book: {value.__module__}"
    assert {"cell_sentences", "encode_prompts", "load_c2s_model", "train_transcoders", "ReplacementModel",
            "LabelTarget", "enrich", "zero_nodes"} <= set(c2s.__all__)
    assert len(c2s.__all__) <= 12


def test_an_unknown_name_lists_the_front_door():
    with pytest.raises(AttributeError, match=r"no attribute 'Replacement'.*'ReplacementModel'"):
        c2s.Replacement


def test_import_is_cheap():
    # The names load on first use: importing the package alone pulls in neither torch nor scanpy.
    code = "import sys, c2srepro; print(sorted(m for m in ('torch', 'scanpy', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_runs_the_tutorials_lines():
    # The README's library section and the tutorial chapter (which CI executes) are one code path.
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Use as a library"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    notebook = json.loads((root / "chapters" / "A1-your-data.ipynb").read_text())
    (path,) = ["".join(c["source"]) for c in notebook["cells"]
               if c["cell_type"] == "code" and "import c2srepro as c2s" in "".join(c["source"])]
    path = "\n".join(line for line in path.splitlines() if not line.startswith("#|"))
    assert blocks[1].strip() == path.strip()
    lines = [line for line in path.splitlines() if line.strip() and not line.startswith(("import ", "from "))]
    assert len(lines) <= 15, f"the path from .h5ad to a label's graph and an intervention takes {len(lines)} lines"
