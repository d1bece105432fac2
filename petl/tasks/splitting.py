"""Section-aware splitting of long documents into character spans (``task.section_split``).

Chunk-and-aggregate works best when chunk boundaries follow the document's own structure: a
contract clause or a note's "Discharge Medications" section then stays in one chunk instead of
being cut in the middle. These functions only find where sections start; packing sections into
token budgets is :mod:`petl.tasks.chunking`'s job.

Styles:

* ``legal``: a line starting with ``Article``/``ARTICLE``/``Art.`` + number or roman numeral,
  ``Section``/``Sec.``/``§`` + number, ``Clause`` + number, ``Amendment`` + roman numeral, a numbered
  paragraph (``12.``, ``3.1``, ``4)`` — court judgments, contracts), a heading line in capitals
  (``GOVERNING LAW``), or a new blank-line paragraph (a clause).
* ``clinical``: a line starting with a section header followed by a colon: a known note header
  (``History of Present Illness:``, ``Brief Hospital Course:``, ``Discharge Medications:``,
  ``HPI:``, ``A/P:`` ...) or any short title-case / capitalised phrase of at most six words.
* ``paragraph``: blank-line separated paragraphs.
* ``none``: the whole document is one section.
"""
from __future__ import annotations

import re

STYLES = ("none", "paragraph", "legal", "clinical")

_LEGAL_HEADING = re.compile(
    r"^[ \t]*(?:"
    r"(?:ARTICLE|Article|ART\.|Art\.)\s+(?:[IVXLC]+|\d+)\b"
    r"|(?:SECTION|Section|SEC\.|Sec\.|§{1,2})\s*\d+"
    r"|(?:CLAUSE|Clause)\s+\d+"
    r"|(?:AMENDMENT|Amendment)\s+(?:[IVXLC]+|\d+)\b"
    r"|\d{1,3}(?:\.\d{1,3})+[.)]?\s+\S|\d{1,3}[.)]\s+\S"
    r"|[A-Z][A-Z ,&'-]{3,60}$"
    r")", re.MULTILINE)

_CLINICAL_HEADERS = (
    "chief complaint", "history of present illness", "hpi", "past medical history", "pmh",
    "past surgical history", "social history", "family history", "physical exam", "physical examination",
    "review of systems", "allergies", "medications on admission", "discharge medications", "medications",
    "pertinent results", "labs", "imaging", "brief hospital course", "hospital course",
    "discharge diagnosis", "discharge diagnoses", "discharge condition", "discharge disposition",
    "discharge instructions", "followup instructions", "follow-up", "assessment and plan", "assessment",
    "plan", "a/p", "impression", "findings", "indication", "technique", "comparison", "history",
    "major surgical or invasive procedure", "service", "reason for admission", "diagnosis",
)
_CLINICAL_HEADING = re.compile(
    r"^[ \t]*(?:(?:" + "|".join(re.escape(h) for h in sorted(_CLINICAL_HEADERS, key=len, reverse=True))
    + r")|[A-Z][A-Za-z/&()'-]*(?:[ \t]+[A-Za-z/&()'-]+){0,5})[ \t]*:", re.MULTILINE | re.IGNORECASE)
_CLINICAL_CASE = re.compile(r"^[ \t]*[A-Z]", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def _starts(text: str, style: str) -> list[int]:
    if style == "legal":  # headings, and clauses written as blank-line paragraphs
        return [m.start() for m in _LEGAL_HEADING.finditer(text)] + _starts(text, "paragraph")
    if style == "clinical":
        # IGNORECASE is needed for the known headers; a generic header must still start upper-case
        return [m.start() for m in _CLINICAL_HEADING.finditer(text)
                if _CLINICAL_CASE.match(text, m.start()) or _is_known_header(m.group(0))]
    if style == "paragraph":
        return [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
    return []


def _is_known_header(match: str) -> bool:
    return match.strip().rstrip(":").strip().lower() in _CLINICAL_HEADERS


def section_spans(text: str, style: str = "none") -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` of the sections of ``text``, in order.

    Spans cover the text without gaps (text before the first heading is a section of its own);
    sections holding only whitespace are dropped.

    Example:
        >>> section_spans("Preamble.\\nArticle I\\nAll powers.\\nArticle II\\nThe executive.", "legal")
        [(0, 10), (10, 32), (32, 57)]
    """
    if style not in STYLES:
        raise ValueError(f"unknown section style {style!r}; choose one of {', '.join(STYLES)}")
    starts = sorted({0, *(_starts(text, style) if text else [])})
    bounds = [*starts, len(text)]
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if text[s:e].strip()]


def split_sections(text: str, style: str = "none") -> list[str]:
    """The section texts of ``text`` (see :func:`section_spans`)."""
    return [text[s:e] for s, e in section_spans(text, style)]
