"""Item text: what the encoder and the prompts see of an item.

``render_text`` joins the known parts in a fixed, readable order, e.g.
``Toy Story (1995). Genres: Animation, Children's, Comedy.`` or
``Legend of Zelda. Categories: Video Games, Action. Brand: Nintendo.`` Missing parts are left out.
"""

from __future__ import annotations

import html
import re
from typing import Iterable, Optional, Sequence

# A trailing "(1995)" (MovieLens titles); also "(1995) " and "(a.k.a. ...) (1995)".
_YEAR_RE = re.compile(r"^(?P<title>.*?)\s*\((?P<year>1[89]\d\d|20\d\d)\)\s*$")
_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]{0,200}>")


def split_title_year(title: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; a title without a year is returned as is."""
    if title is None:
        return None, None
    m = _YEAR_RE.match(title)
    if not m or not m.group("title"):
        return title, None
    return m.group("title"), int(m.group("year"))


def clean_text(value: Optional[str], max_chars: int) -> Optional[str]:
    """Unescape HTML entities, drop tags, squeeze whitespace, cut to ``max_chars`` (on a word)."""
    if value is None:
        return None
    s = _SPACES.sub(" ", _TAGS.sub(" ", html.unescape(str(value)))).strip()
    if not s:
        return None
    if len(s) > max_chars:
        cut = s[:max_chars].rsplit(" ", 1)[0] if " " in s[:max_chars] else s[:max_chars]
        s = cut.rstrip(" ,;:-") + "..."
    return s


def parse_year(value) -> Optional[int]:
    """A plausible 4-digit year from ints, floats or strings like '1995', '1995.0', '01-Jan-1995'."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        y = int(value) if value == value else None  # NaN check
    else:
        m = re.search(r"(1[89]\d\d|20\d\d)", str(value))
        y = int(m.group(1)) if m else None
    return y if y is not None and 1800 <= y <= 2100 else None


def dedup_keep_order(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for v in values:
        if v and v not in seen:
            seen.add(v)
            out.append(v)
    return out


def render_text(
    title: Optional[str],
    categories: Optional[Sequence[str]] = None,
    brand: Optional[str] = None,
    year: Optional[int] = None,
    description: Optional[str] = None,
    *,
    fields: Sequence[str] = ("title", "year", "categories", "brand"),
    category_label: str = "Categories",
    fallback: str = "",
) -> str:
    """One line describing an item. ``fields`` picks and orders the parts."""
    head = title if ("title" in fields and title) else fallback
    if "year" in fields and year is not None:
        head = f"{head} ({year})" if head else f"({year})"
    parts = [head] if head else []
    for f in fields:
        if f == "categories" and categories:
            parts.append(f"{category_label}: {', '.join(categories)}")
        elif f == "brand" and brand:
            parts.append(f"Brand: {brand}")
        elif f == "description" and description:
            parts.append(description)
    return ". ".join(p.rstrip(".") for p in parts) + ("." if parts else "")
