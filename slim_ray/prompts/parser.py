"""Split an answer into its three steps and flag the usual failures of small models.

``parse_answer(text, history_titles)`` returns step1/step2/step3 (None when missing), how many
steps were found, and the history titles the answer recommends again (searched in step 3; in step 2
when step 3 is missing; in the whole answer only when it has no step headers). Step headers are matched leniently:
``Step 1:``, ``**Step 1.**``, ``### Step 1 -``, ``step 2)`` ... An answer without any step header
is kept whole in ``step1 = None`` and flagged with ``steps_found = 0``; it is never dropped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Sequence

_STEP = re.compile(
    r"(?im)(?:^[\s>#*_\-]*(?:\*\*)?\s*step\s*([123])\s*(?:\*\*)?\s*[:.)\-\u2013\u2014]?"  # line start
    r"|\bstep\s*([123])\s*(?:\*\*)?\s*:)"  # inline "... Step 2: ..." needs the colon
    r"\s*(?:\*\*)?"
)
_YEAR = re.compile(r"\s*\((?:1[89]\d\d|20\d\d)\)\s*$")
_ARTICLE_SUFFIX = re.compile(r"^(?P<t>.*),\s*(?P<a>the|a|an|les|la|le|il|das|der|die|el|l')$", re.I)
_NON_WORD = re.compile(r"[^0-9a-z]+")


@dataclass
class ParsedAnswer:
    step1: Optional[str]
    step2: Optional[str]
    step3: Optional[str]
    steps_found: int
    seen_items: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.steps_found == 3


def split_steps(text: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """The text after each ``Step n`` header up to the next header (first occurrence of each n)."""
    text = text or ""
    marks = [(int(m.group(1) or m.group(2)), m.start(), m.end()) for m in _STEP.finditer(text)]
    out: dict[int, str] = {}
    for i, (n, _, end) in enumerate(marks):
        if n in out:
            continue
        stop = marks[i + 1][1] if i + 1 < len(marks) else len(text)
        body = text[end:stop].strip()
        out[n] = body
    return tuple(out.get(n) or None for n in (1, 2, 3))  # type: ignore[return-value]


def normalize_title(title: str) -> str:
    """``"Godfather, The (1972)"`` -> ``"the godfather"``: year dropped, trailing article moved
    to the front, accents and punctuation removed, lower case."""
    t = _YEAR.sub("", title or "").strip()
    t = re.sub(r"\s*\(a\.k\.a\..*?\)", "", t, flags=re.I)
    m = _ARTICLE_SUFFIX.match(t)
    if m:
        t = f"{m.group('a')} {m.group('t')}"
    t = unicodedata.normalize("NFKD", t).encode("ascii", "ignore").decode()
    return _NON_WORD.sub(" ", t.lower()).strip()


_LIST_MARK = re.compile(r"(?:^|(?<=\s))(?:\d{1,2}[.)]|[-*\u2022])\s+")


def seen_titles(text: str, history_titles: Sequence[str], min_chars: int = 4) -> list[str]:
    """History titles that occur (as whole words, normalised) in ``text``, in history order.

    The text is cut into list entries first (lines, ``1.``/``2)``/``-`` markers), so a list number
    after a title is not read as a sequel number; within an entry, a title followed by a number or
    roman numeral ("Toy Story 2") is a sequel, not a repeat.
    """
    segments = [f" {normalize_title(seg)} " for line in (text or "").splitlines() for seg in _LIST_MARK.split(line)]
    found, seen = [], set()
    for title in history_titles:
        norm = normalize_title(title)
        if len(norm) < min_chars or norm in seen:
            continue
        seen.add(norm)
        pat = re.compile(rf" {re.escape(norm)} (?!(?:\d+|ii|iii|iv|part) )")
        if any(pat.search(seg) for seg in segments):
            found.append(title)
    return found


def parse_answer(text: str, history_titles: Sequence[str] = ()) -> ParsedAnswer:
    s1, s2, s3 = split_steps(text)
    found = sum(s is not None for s in (s1, s2, s3))
    # where recommendations are: Step 3; without it Step 2 (Step 1 restates the history, which is
    # not a recommendation); the whole answer only when it has no step headers at all
    recs = s3 if s3 is not None else (s2 if s2 is not None else ("" if s1 is not None else (text or "")))
    return ParsedAnswer(s1, s2, s3, found, seen_titles(recs, history_titles))
