"""The paper's published numbers (c2srepro.book.paper) against the paper's text, and their one home."""

import io
import tokenize
from pathlib import Path

import nbformat
import numpy as np
import pytest

from c2srepro.book import paper

ROOT = Path(__file__).resolve().parents[1]


def test_table4_transcription():
    # The paper prints each layer's fraction as a percentage with two decimals.
    percentages = [67.24, 88.83, 87.29, 83.01, 84.22, 84.87, 88.31, 87.40, 87.83, 84.87, 84.91, 85.28,
                   88.31, 88.09, 91.14, 89.40, 87.66, 88.64, 89.01, 89.76, 88.73, 89.02, 87.20, 81.78]
    np.testing.assert_allclose((100 * paper.TABLE4["fraction"]).round(2), percentages)
    assert paper.TABLE4["layer"].tolist() == list(range(24))


def test_tables_1_2_and_the_derived_fraction():
    assert paper.TABLE1 == {"original": 2.48, "transcoder": 4.63, "no_mlp": 12.67}
    assert paper.TABLE2 == {"transcoder": 2.406, "no_mlp": 10.52}
    assert paper.FRACTION_LOSS_RECOVERED == pytest.approx(8.04 / 10.19)
    assert paper.PAPER_VALUES["fraction_loss_recovered"].value == paper.FRACTION_LOSS_RECOVERED
    assert paper.PAPER_VALUES["loss_ordering"].value == "2.48 < 4.63 < 12.67"
    assert paper.PAPER_VALUES["kl_ordering"].value == "2.406 < 10.52"
    assert paper.PAPER_VALUES["table3_layer"].value == "12 of 24"
    assert paper.HYPERPARAMETERS["d_tc"] == 8 * 1024 == paper.HYPERPARAMETERS["expansion_factor"] * 1024


def test_every_paper_value_has_a_known_kind():
    assert {v.kind for v in paper.PAPER_VALUES.values()} == {"setting", "result", "claim"}
    assert sum(k.startswith("table4_fraction_layer_") for k in paper.PAPER_VALUES) == 24


def _number_literals(source: str) -> list[str]:
    """The numeric literals of Python source (comments and strings, which may quote the paper, left out)."""
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NUMBER]


def test_the_papers_numbers_are_typed_only_in_paper_py():
    # Tables 1-2, the case study's score and Table 4's first layers' counts appear as numbers nowhere else.
    published = {"12.67", "4.63", "2.406", "10.52", "315.17", "0.0013"}
    offenders = {}
    for path in [*ROOT.glob("c2srepro/**/*.py"), *ROOT.glob("chapters/*.ipynb")]:
        if path.name == "paper.py":
            continue
        if path.suffix == ".ipynb":
            cells = nbformat.read(path, as_version=4).cells
            sources = [c.source for c in cells if c.cell_type == "code"]
        else:
            sources = [path.read_text()]
        numbers = [n for source in sources for n in _number_literals(source)]
        found = published & set(numbers) or ({"116, 179, 606"} if "".join(numbers).find("116179606") >= 0 else set())
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert offenders == {}
