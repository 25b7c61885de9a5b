"""The HTML pieces both run reports are built from: escaping, a table of figures, a captioned image."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


def esc(value: Any) -> str:
    """``value`` as text, HTML-escaped."""
    return html.escape(str(value))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, anything else escaped."""
    return f"{value:.{digits}f}" if isinstance(value, float) else esc(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """An HTML table of ``rows`` under ``header`` (floats to ``digits`` decimals)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c, digits)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(src: str, caption: str = "", width: int = 128) -> str:
    """A ``<figure>`` of the image at ``src`` with ``caption`` under it."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(src)}" width="{width}" alt="{esc(caption)}">{cap}</figure>'


__all__ = ["esc", "fmt", "img", "table"]
