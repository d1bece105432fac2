"""Rule-based de-identification of clinical text, run before tokenisation (``task.deidentify``).

It removes the HIPAA Safe-Harbor identifiers that regular expressions find reliably, replacing each
with a bracketed placeholder so the model still sees that something stood there:

=============  ==========================================================================  ===========
category       what matches                                                                placeholder
=============  ==========================================================================  ===========
email          ``name@host.tld``                                                           ``[EMAIL]``
record         labelled numbers (``MRN: 123456`` -> ``MRN: [RECORD]``, ``Medical Record No.``,  ``[RECORD]``
               ``SSN``, ``Acct #``, ``Patient ID``), ``123-45-6789``, any run of 7+ digits
phone          ``(617) 555-0123``, ``617-555-0123``, ``617.555.0123``, ``+1 617 555 0123``    ``[PHONE]``
date           ``2012-03-04``, ``03/04/2012``, ``3-4-12``, ``March 4, 2012``, ``4th of Mar    ``[DATE]``
               2012``, ``Mar 4``, ``March 2012`` (a bare year is kept, as Safe Harbor allows)
age            ages over 89: ``92 year old``, ``92-year-old``, ``95 yo``, ``aged 101``,      ``[AGE>89]``
               ``age: 90`` (ages up to 89 are kept)
name           every name of a supplied list, whole words, case-insensitive                ``[NAME]``
=============  ==========================================================================  ===========

E-mail addresses are replaced first (a listed surname inside an address must not break it), then
listed names, then the other rules in the order of the table, so a phone number is not mistaken
for a date and a record number is not read as a phone number. This is a safety net, not a certified
de-identification: free text can hold identifiers no rule anticipates (unlisted names, addresses),
which is why ``phi: true`` also keeps raw text out of every log (see :mod:`petl.tasks.phi`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"(?:[0-2]?\d|3[01])(?:st|nd|rd|th)?"

#: category -> (compiled pattern, replacement template); applied in this order. Labels such as
#: "MRN:" or "age" are kept (group 1), only the identifier itself is replaced.
RULES: dict[str, tuple[re.Pattern, str]] = {
    "email": (re.compile(r"\b[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"), "[EMAIL]"),
    "record": (re.compile(
        r"\b((?:MRN|Medical\s+Record(?:\s+(?:Number|No\.?|#))?|Record\s+(?:Number|No\.?|#)|SSN|"
        r"Acct\.?(?:\s*(?:Number|No\.?|#))?|Account\s+(?:Number|No\.?|#)|Patient\s+ID|Unit\s+No\.?)"
        r"\s*[:#]?\s*)[A-Z]{0,3}-?\d[\d-]{3,}\b|\b\d{3}-\d{2}-\d{4}\b", re.IGNORECASE), r"\1[RECORD]"),
    "phone": (re.compile(r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\w)"
                         r"|\+\d{1,3}(?:[\s.-]\d{2,4}){2,4}(?!\w)"), "[PHONE]"),
    "date": (re.compile(
        r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[/-]\d{1,2}[/-](?:\d{4}|\d{2})\b|\b\d{1,2}\.\d{1,2}\.\d{4}\b"
        rf"|\b{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?\b|\b{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+\d{{4}})?\b"
        rf"|\b{_MONTH}\s+\d{{4}}\b", re.IGNORECASE), "[DATE]"),
    "age": (re.compile(
        r"\b()(?:9\d|1[0-4]\d)(?=\s*-?\s*(?:years?|yrs?|y/?o)\b)"
        r"|\b(aged?\s*:?\s*)(?:9\d|1[0-4]\d)\b", re.IGNORECASE), r"\1\2[AGE>89]"),
    "long_number": (re.compile(r"\b\d{7,}\b"), "[RECORD]"),
}


def load_names(path: str | Path) -> list[str]:
    """Names to remove, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task.deid_names_file {str(path)!r} does not exist; give a text file "
                                "with one name per line")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class Deidentifier:
    """Replace identifiers in text with placeholders.

    Args:
        names (Iterable[str]): names (people, places, institutions) to remove as whole words,
            case-insensitive; longer names are matched first ("Mary Ann Smith" before "Mary").
        categories (Iterable[str]): rule categories to apply. Default: all of ``RULES``.

    Example:
        >>> Deidentifier(names=["Smith"]).deidentify("Mr. Smith, 92 yo, seen 03/04/2012.")
        'Mr. [NAME], [AGE>89] yo, seen [DATE].'
    """

    names: Iterable[str] = ()
    categories: Iterable[str] = tuple(RULES)
    _names_re: re.Pattern | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.categories) - set(RULES))
        if unknown:
            raise ValueError(f"unknown de-identification category {unknown[0]!r}; choose from {', '.join(RULES)}")
        wanted = set(self.categories)
        self.categories = tuple(c for c in RULES if c in wanted)
        names = sorted({n.strip() for n in self.names if n.strip()}, key=len, reverse=True)
        self.names = tuple(names)
        if names:
            self._names_re = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)",
                                        re.IGNORECASE)

    def deidentify(self, text: str) -> str:
        rules = list(self.categories)
        for category in rules[:1] if rules[:1] == ["email"] else []:
            text = RULES[category][0].sub(RULES[category][1], text)
        if self._names_re is not None:
            text = self._names_re.sub("[NAME]", text)
        for category in rules[1:] if rules[:1] == ["email"] else rules:
            pattern, placeholder = RULES[category]
            text = pattern.sub(placeholder, text)
        return text

    __call__ = deidentify

    def deidentify_span_text(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """De-identify ``text`` while keeping character spans (QA answers) aligned.

        The text is cut at every span boundary and each piece is de-identified on its own, so an
        answer span maps to its de-identified counterpart. Returns (new text, new spans).
        """
        cuts = sorted({0, len(text), *(p for span in spans for p in span)})
        pieces, new_pos = [], {0: 0}
        for start, end in zip(cuts, cuts[1:]):
            pieces.append(self.deidentify(text[start:end]))
            new_pos[end] = new_pos[start] + len(pieces[-1])
        return "".join(pieces), [(new_pos[s], new_pos[e]) for s, e in spans]
