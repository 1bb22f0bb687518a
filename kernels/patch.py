"""What patching a model with a kernel changed, and how to undo it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ModelPatch:
    """The changes a kernel patch made to a model, in words; `undo()` puts the model back as it was."""

    changes: list[str]
    _undo: list[Callable[[], None]] = field(repr=False)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
