"""The sparsity frontier's figure (c2srepro.transcoder.plots.plot_frontier)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest

from c2srepro.transcoder.plots import plot_frontier


def _frame():
    rows = []
    for variant in ("relu", "topk", "relu+skip"):
        for i, l0 in enumerate((24, 3, 12, 6)):  # out of order: the curve is drawn in order of L0
            rows.append({"variant": variant, "setting": f"s={i}", "l0": l0, "fraction_loss_recovered": l0 / 30,
                         "fvu": 1 / l0, "dead_fraction": 0.0, "paper_setting": variant == "relu" and i == 2})
    return pd.DataFrame(rows)


def test_one_curve_per_variant_in_order_of_l0_and_the_paper_setting_ringed():
    fig = plot_frontier(_frame())
    left, right = fig.axes
    lines = {line.get_label(): line for line in left.get_lines()}
    assert set(lines) == {"relu", "topk", "relu+skip"}
    assert list(lines["topk"].get_xdata()) == [3, 6, 12, 24]
    assert lines["relu+skip"].get_linestyle() == "--" and lines["relu"].get_linestyle() == "-"
    ringed = left.collections[0].get_offsets()
    assert ringed.tolist() == [[12, 0.4]]
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([1 / 3, 1 / 6, 1 / 12, 1 / 24])


def test_a_table_without_the_frontier_columns_is_refused():
    with pytest.raises(ValueError, match=r"lacks columns \['fvu'\].*bench_frontier"):
        plot_frontier(_frame().drop(columns="fvu"))


def test_a_cached_table_says_when_it_is_missing_or_for_another_model(tmp_path):
    from c2srepro.book.provenance import read_cached_table, write_table

    path = tmp_path / "default.csv"
    table, note = read_cached_table(path, inputs={"model": "m1"}, regenerate="python bench/x.py")
    assert table is None and note == f"{path} is missing: make it with `python bench/x.py`"
    write_table(path, _frame(), params={}, inputs={"model": "m1", "split": "s1"})
    table, note = read_cached_table(path, inputs={"model": "m1", "split": "s1"}, regenerate="python bench/x.py")
    assert note is None and table.equals(pd.read_csv(path)) and len(table) == 12
    table, note = read_cached_table(path, inputs={"model": "m2", "split": "s1"}, regenerate="python bench/x.py")
    assert len(table) == 12
    # Without the recipe on both sides another model's weights cannot be told from a sibling's: stale.
    assert note == (f"{path} is stale: it was made from another model than these results (model m1 there, m2 here), "
                    "so its numbers are not this model's; regenerate it with `python bench/x.py`")


def test_a_cached_table_from_a_sibling_model_is_told_from_a_stale_one(tmp_path):
    from c2srepro.book.provenance import read_cached_table, write_table

    path = tmp_path / "default.csv"
    write_table(path, _frame(), params={"heldout_accuracy": 0.7714}, inputs={"model": "w1", "split": "s1", "recipe": "r1"})
    here = {"model": "w2", "split": "s1", "recipe": "r1"}
    table, note = read_cached_table(path, inputs=here, regenerate="python bench/x.py", accuracy=0.7786)
    assert len(table) == 12
    assert note == (f"{path} was made on a sibling of this model (the same recipe r1 and split s1, trained on another "
                    "machine, whose float rounding gives other weights: held-out accuracy 0.771 there, 0.779 here).")
    for other in ({"recipe": "r2"}, {"split": "s2"}):
        table, note = read_cached_table(path, inputs=here | other, regenerate="python bench/x.py", accuracy=0.7786)
        key = next(iter(other))
        assert note.startswith(f"{path} is stale: it was made from another model and {key} than these results "
                               f"(model w1 there, w2 here; {key} {key[0]}1 there, {key[0]}2 here)"), note
        assert note.endswith("regenerate it with `python bench/x.py`")
    # A record that does not name the recipe: stale, saying so.
    write_table(path, _frame(), params={}, inputs={"model": "w1", "split": "s1"})
    _, note = read_cached_table(path, inputs=here, regenerate="python bench/x.py")
    assert "made from another model and recipe than these results (model w1 there, w2 here; its record names no recipe)" in note
