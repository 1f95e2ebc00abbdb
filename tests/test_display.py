"""The book's table formatting (c2srepro.book.display)."""

import math

import numpy as np
import pandas as pd
import pytest

from c2srepro.book.display import badge, format_number, format_p, is_p_column, table


def test_numbers_read_as_numbers():
    assert format_number(0.123456) == "0.123"
    assert format_number(12.3456) == "12.3"
    assert format_number(12345.6) == "12346"  # no exponent for large values
    assert format_number(0.000123456) == "0.000123"
    assert format_number(np.float32(0.5)) == "0.5"
    assert format_number(np.int64(457)) == "457" and format_number(60_000_000) == "60000000"
    assert format_number(3.0) == "3"  # an integer column that acquired NaN
    assert format_number(math.nan) == "" and format_number(None) == "" and format_number(pd.NA) == ""
    assert format_number(True) == "True" and format_number("VWF") == "VWF"
    assert format_number(["VWF", "PTPRB"]) == "VWF, PTPRB"
    assert format_number(1 / 3, digits=4) == "0.3333"


def test_p_values_are_compact():
    assert format_p(2.465430e-21) == "2.5e-21"
    assert format_p(0.0013) == "0.0013" and format_p(0.04567) == "0.046"
    assert format_p(0.0) == "0" and format_p(math.nan) == ""
    for name in ("P-value", "Adjusted P-value", "top_fdr", "fdr", "p_value", "prompt_subset_p_value", "p"):
        assert is_p_column(name), name
    for name in ("Odds Ratio", "top_term", "pathway", "n_features", "difference"):
        assert not is_p_column(name), name


def test_table_drops_unnamed_index_and_keeps_named_one():
    frame = pd.DataFrame({"feature": [3, 9], "top_fdr": [2.465430e-21, 0.5], "score": [315.17123, 0.1]}, index=[34, 457])
    html = table(frame).to_html()
    assert ">34<" not in html and ">457<" not in html
    assert "2.5e-21" in html and "315" in html and "315.17123" not in html and ">0.1<" in html
    assert 'class="dataframe c2s-table"' in html
    assert ">top fdr<" in html and list(table(frame).data.columns) == ["feature", "top_fdr", "score"]
    assert table(frame).to_html() == html  # the same table gives the same HTML (no random id)

    named = pd.DataFrame({"training": [5, 2]}, index=pd.Index(["B cell", "NK"], name="cell type"))
    shown = table(named).data
    assert list(shown.columns) == ["cell type", "training"] and shown["cell type"].tolist() == ["B cell", "NK"]
    series = table(pd.Series({"heldout_accuracy": 0.91234, "n_layers": 4}, name="value").rename_axis("quantity"))
    assert list(series.data.columns) == ["quantity", "value"]
    assert ">0.912<" in series.to_html() and ">4<" in series.to_html()


def test_table_p_columns_and_errors():
    frame = pd.DataFrame({"q": [1.234e-9]})
    assert "1.2e-09" in table(frame, p_columns=["q"]).to_html()
    with pytest.raises(ValueError, match=r"p_columns \['nope'\] are not columns"):
        table(frame, p_columns=["nope"])
    with pytest.raises(ValueError, match=r"html_columns \['link'\] are not columns"):
        table(frame, html_columns=["link"])
    with pytest.raises(TypeError, match="takes a pandas DataFrame or Series, got list"):
        table([1, 2])
    with pytest.raises(ValueError, match="digits must be >= 1"):
        table(frame, digits=0)


def test_text_is_escaped_and_badges_are_inline():
    html = table(pd.DataFrame({"token": ["<|endoftext|>"], "note": ["a & b"]})).to_html()
    assert "&lt;|endoftext|&gt;" in html and "a &amp; b" in html and "<|endoftext|>" not in html
    assert badge("ok", background="#d8f0d8") == '<span style="background-color: #d8f0d8; padding: 0 0.3em; border-radius: 3px; white-space: nowrap">ok</span>'
    assert badge("x", font_size="85%") == '<span style="font-size: 85%">x</span>' and badge("y") == "y"
