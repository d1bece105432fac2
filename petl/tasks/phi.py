"""Protected health information (``task.phi: true``): keep raw text out of terminals, logs and files.

A run marked ``phi`` (every clinical recipe on credentialed data) changes three things:

* no sample preview: the decoded first training example that other runs print is replaced by a
  line saying it was withheld;
* predictions written to ``predictions.jsonl`` carry record indices and label ids only — never
  the generated text, extracted spans or references;
* error messages are withheld: third-party errors can quote their input (a tokenizer rejecting a
  record prints it), so an exception other than petl's own inside a PHI run is re-raised as
  :class:`PhiWithheldError` naming only the exception type and where it happened.
  ``PETL_PHI_DEBUG=1`` shows the original (only on a machine cleared for the data).

petl's own messages never contain record values in any mode: they name fields, indices and
settings. Training logs (loss, learning rate, gradient norm) contain no text either.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from petl.errors import PetlError

PREVIEW_CHARS = 300


class PhiWithheldError(PetlError, RuntimeError):
    """An error inside a ``phi`` run, with its message withheld because it may quote patient text."""


def sample_preview(text: str, phi: bool, label: str = "sample") -> str:
    """A one-line preview of a training example for the terminal (withheld when ``phi``)."""
    if phi:
        return f"[petl] {label}: withheld (task.phi is true: raw text is never printed)"
    flat = " ".join(text.split())
    more = "..." if len(flat) > PREVIEW_CHARS else ""
    return f"[petl] {label}: {flat[:PREVIEW_CHARS]}{more}"


@contextlib.contextmanager
def phi_guard(enabled: bool, stage: str = "the task run") -> Iterator[None]:
    """Re-raise any exception of the block without its message when ``enabled``.

    Args:
        enabled (bool): the recipe's ``task.phi``.
        stage (str): where the block is, named in the withheld error (e.g. "tokenising").
    """
    if not enabled or os.environ.get("PETL_PHI_DEBUG"):
        yield
        return
    failure = None
    try:
        yield
    except PetlError:  # petl's own messages name fields, indices and settings, never record text
        raise
    except Exception as exc:  # noqa: BLE001 - any error may quote its input
        failure = type(exc).__name__
    if failure is not None:  # raised outside the handler, so the original is not even chained
        raise PhiWithheldError(f"{failure} during {stage}; its message is withheld because task.phi is true (it "
                               "may quote patient text). Set PETL_PHI_DEBUG=1 on a machine cleared for the data "
                               "to see it")
