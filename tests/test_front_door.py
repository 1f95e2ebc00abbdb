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
    assert {"cell_sentences", "encode_prompts", "load_c2s_model", "train_transcoders", "trace_cell",
            "find_circuit", "enrich", "ablate"} <= set(c2s.__all__)


def test_an_unknown_name_lists_the_front_door():
    with pytest.raises(AttributeError, match=r"no attribute 'trace'.*'trace_cell'"):
        c2s.trace


def test_import_is_cheap():
    # The names load on first use: importing the package alone pulls in neither torch nor scanpy.
    code = "import sys, c2srepro; print(sorted(m for m in ('torch', 'scanpy', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
