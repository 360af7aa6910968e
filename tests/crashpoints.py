"""kill -9 at a chosen step, for the child processes of the crash tests (test_83, test_84):
they run with this directory on their path and hook the step they die after."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_calls: dict[str, int] = {}


def die_after(owner: Any, attr: str, nth: int = 1,  # noqa: ANN401 - any object's method
              when: Callable[..., bool] = lambda *a: True) -> None:
    """Wrap ``owner.attr``: on the ``nth`` call (counting those whose arguments satisfy
    ``when``) it returns, and the process ends at once with status 9, as under kill -9 (no
    cleanup, nothing flushed)."""
    real = getattr(owner, attr)

    def hooked(*a: Any, **k: Any) -> Any:  # noqa: ANN401
        out = real(*a, **k)
        if when(*a):
            _calls[attr] = _calls.get(attr, 0) + 1
            if _calls[attr] == nth:
                os._exit(9)
        return out

    setattr(owner, attr, hooked)
