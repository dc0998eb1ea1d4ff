"""Calls to the Hugging Face Hub, shared by every push (`align publish`, a stage's `push_to_hub`, the trees
export's `--push-to-hub`): below all of them, so none imports another for it."""

from __future__ import annotations

from align.core.errors import AlignError


def hub_call(what: str, fn, *args, **kwargs):
    """A Hub call whose failure (network, auth, quota) is one line naming what failed."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        raise AlignError(f"{what} failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
