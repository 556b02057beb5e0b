"""The one exception memplan raises: :class:`PlanError`."""

from __future__ import annotations

from typing import Optional


class PlanError(ValueError):
    """A plan memplan cannot estimate: bad input, or a size beyond 64 bits.

    ``str(err)`` is the CLI's one-line message (without its ``error:`` prefix), ``field`` the
    plan field, flag or torchtitan key at fault (or None), ``kind`` one of ``"input"``,
    ``"overflow"``, ``"output"``, ``"runtime"``.

    >>> import memplan
    >>> try:
    ...     memplan.estimate(model="llama3-8b", micro_batch_size=-5)
    ... except memplan.PlanError as e:
    ...     print(e.field)
    --micro-batch-size
    """

    def __init__(self, message: str, field: Optional[str] = None, kind: str = "input") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.kind = kind

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this error: 2 for bad input, 3 otherwise."""
        return 2 if self.kind in ("input", "overflow") else 3

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (PlanError, (self.message, self.field, self.kind))


class DoesNotFit(RuntimeError):
    """Raised by :func:`memplan.preflight` when the plan does not fit; ``estimate`` holds why."""

    def __init__(self, message: str, estimate: object) -> None:
        super().__init__(message)
        self.estimate = estimate
