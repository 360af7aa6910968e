"""The commit hooks: what the filesystem runs after each commit and each rollback of the metadata
engine it is built on."""

from __future__ import annotations

from collections.abc import Callable


class CommitHooks:
    """What runs after each commit and each rollback of the metadata engine. It exists before
    both: the engine is built with :meth:`committed` and :meth:`rolled_back` as its callbacks,
    and the filesystem, built later on that engine, listens from its constructor (its deferred
    writes: forgotten once committed, written again after a rollback). Listeners run on the
    thread that commits, under the filesystem lock."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def listen(self, on_commit: Callable[[], None], on_rollback: Callable[[], None]) -> None:
        self._listeners.append((on_commit, on_rollback))

    def committed(self) -> None:
        for on_commit, _ in self._listeners:
            on_commit()

    def rolled_back(self) -> None:
        for _, on_rollback in self._listeners:
            on_rollback()
