"""Tables as the book shows them: formatted for reading, not for the machine.

:func:`table` turns a DataFrame (or Series) into a pandas ``Styler`` whose HTML the chapters
display; the numbers themselves are untouched (the CSV and JSON results keep full precision).

1. The index: a named index (``cell type``, ``layer``) holds data and becomes the first column;
   an unnamed one (0, 1, 2 or the row labels a filter left, such as 34, 457) is dropped.
2. Each cell is formatted by its value: ``None`` and NaN as empty; booleans and strings as they
   are; integers as integers; floats with ``digits`` significant digits (no exponent below
   ``10**digits``; integral floats of an integer column that acquired NaN are shown as integers);
   lists and tuples joined by ", ".
3. p-values and FDRs (columns named like ``p_value``, ``P-value``, ``Adjusted P-value``,
   ``fdr``, ``top_fdr``; or those given in ``p_columns``) get two significant digits, in
   scientific form when small: ``2.5e-21``, ``0.0013``.
4. Column headers read as words (``random_fraction`` shows as "random fraction", so a wide table's
   headers can wrap); the data keep their names. Text is HTML-escaped (a token such as ``<|endoftext|>`` shows as itself). Styling that must
   survive Quarto, which drops a Styler's ``<style>`` block from rendered pages, goes inline: see
   :func:`badge`.
5. The table's id is derived from its content, so an executed notebook is the same on every run.

Interactive figures: :func:`interactive` shows a plotly figure as two HTML outputs: plotly.js
itself (so the rendered book draws it offline; plotly's notebook renderers ``notebook_connected``
and ``plotly_mimetype`` would load it from a CDN), then the figure's element and drawing script.
Quarto moves an HTML output that carries plotly.js (it recognises the library's licence banner)
into the page's ``<head>``, whole: with the figure in the same output, the figure would leave its
cell's ``<figure>`` and land at the top of the page, its caption empty. Split, the library goes to
the head once per page and the figure stays in its figure. The element id is derived from the
figure's content. A figure whose ``layout.meta["click_opens"]`` names a ``customdata`` entry (as
:func:`c2srepro.attribution.plots.graph_figure` does for ``links``) opens that entry's URL when a
point carrying one is clicked, through plotly's ``plotly_click`` event in the figure's script.
"""

from __future__ import annotations

import hashlib
import html
import math
import numbers
import re
from collections.abc import Sequence

import pandas as pd
from pandas.io.formats.style import Styler

__all__ = ["Interactive", "badge", "format_number", "format_p", "interactive", "is_p_column", "table"]

# Column names that hold p-values or FDRs (matched case-insensitively, as whole words).
_P_NAMES = re.compile(r"(^|[\s_])(p[\s_-]?value|fdr|q[\s_-]?value)($|[\s_])", re.IGNORECASE)
TABLE_CLASS = "dataframe c2s-table"


def is_p_column(name) -> bool:
    """Whether a column name says it holds p-values or FDRs (module docstring, step 3)."""
    return isinstance(name, str) and (name.lower() == "p" or bool(_P_NAMES.search(name)))


def format_p(value) -> str:
    """A p-value or FDR in two significant digits: ``2.5e-21``, ``0.013``; empty for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    value = float(value)
    return "0" if value == 0 else f"{value:.2g}"


def format_number(value, *, digits: int = 3) -> str:
    """One cell's text (module docstring, step 2)."""
    if value is None:
        return ""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 10**digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_number(v, digits=digits) for v in value)
    if value is pd.NA or value is pd.NaT:
        return ""
    return str(value)


def badge(text: str, *, background: str | None = None, font_size: str | None = None) -> str:
    """``text`` (already HTML-escaped) in a ``<span>`` with inline style, for a Styler formatter."""
    style = "; ".join(part for part in (
        f"background-color: {background}; padding: 0 0.3em; border-radius: 3px; white-space: nowrap" if background else "",
        f"font-size: {font_size}" if font_size else "",
    ) if part)
    return f'<span style="{style}">{text}</span>' if style else text


# plotly's to_html puts the figure's element id in for {plot_id}.
_CLICK_OPENS = """document.getElementById('{plot_id}').on('plotly_click', function (event) {
  var url = event.points.length && event.points[0].customdata && event.points[0].customdata[COLUMN];
  if (url) { window.location.href = url; }
});"""


class Interactive:
    """A plotly figure for the book (module docstring): displayed as plotly.js, then the figure."""

    def __init__(self, figure) -> None:
        if not hasattr(figure, "to_html") or not hasattr(figure, "to_json"):
            raise TypeError(f"interactive() takes a plotly Figure (e.g. from graph_figure), got {type(figure).__name__}")
        self.figure = figure
        self.div_id = "plotly-" + hashlib.sha256(figure.to_json().encode()).hexdigest()[:12]

    def library_html(self) -> str:
        from plotly.offline import get_plotlyjs

        return f'<script type="text/javascript">{get_plotlyjs()}</script>'

    def figure_html(self) -> str:
        meta = self.figure.layout.meta
        column = meta.get("click_opens") if isinstance(meta, dict) else None
        opens = None if column is None else _CLICK_OPENS.replace("COLUMN", str(int(column)))
        return self.figure.to_html(full_html=False, include_plotlyjs=False, div_id=self.div_id, post_script=opens,
                                   config={"responsive": True, "displaylogo": False})

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(HTML(self.library_html()))
        display(HTML(self.figure_html()))


def interactive(figure) -> Interactive:
    """A plotly figure as the book shows it, plotly.js embedded (module docstring); the value of a
    notebook cell's last line, or passed to ``display``."""
    return Interactive(figure)


def _frame(data: pd.DataFrame | pd.Series) -> pd.DataFrame:
    if isinstance(data, pd.Series):
        data = data.to_frame(data.name if data.name is not None else "value")
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"table() takes a pandas DataFrame or Series, got {type(data).__name__}")
    if any(name is not None for name in data.index.names):
        return data.reset_index()
    return data.reset_index(drop=True)


def table(
    data: pd.DataFrame | pd.Series, *, digits: int = 3, p_columns: Sequence[str] | None = None,
    html_columns: Sequence[str] = (),
) -> Styler:
    """The styled table of ``data`` for the book: index hidden (or shown as a column when it is
    named), numbers to ``digits`` significant digits, p-values and FDRs compact (module docstring).
    ``p_columns``: columns holding p-values in addition to those recognised by name;
    ``html_columns``: columns of HTML (links) made by the caller, shown as HTML, not escaped."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    frame = _frame(data)
    if not frame.columns.is_unique:
        raise ValueError(f"table() needs unique column names; repeated: {frame.columns[frame.columns.duplicated()].tolist()}")
    extra = set(p_columns or ())
    for argument, named in (("p_columns", extra), ("html_columns", set(html_columns))):
        unknown = sorted(map(str, named - set(frame.columns)))
        if unknown:
            raise ValueError(f"{argument} {unknown} are not columns of the table; columns: {list(frame.columns)}")
    formatters = {
        column: format_p if (column in extra or is_p_column(column)) else (lambda v: format_number(v, digits=digits))
        for column in frame.columns
    }
    uuid = hashlib.sha1(frame.to_csv(index=False).encode()).hexdigest()[:10]
    styled = frame.style.format(formatters, escape="html")
    if html_columns:
        styled = styled.format(str, subset=list(html_columns), escape=None)
    return (
        styled
        .format_index(lambda name: html.escape(str(name).replace("_", " ")), axis="columns")
        .hide(axis="index")
        .set_uuid(uuid)
        .set_table_attributes(f'class="{TABLE_CLASS}"')
    )
