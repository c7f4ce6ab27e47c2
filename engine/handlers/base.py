"""The one interface every kind of job has.

A handler turns a claimed job into the work it needs and, once that work is done, stores the result and answers:

    work = await handler.prepare(job, services)         # None: the job was answered already (refused, with why)
    ... the loop runs the work: `Rows` join the pool and advance one step a tick; a `OnePass` renders beside the ticks
    await handler.store(job, services, work, outcome)   # outcome: the pool's `Finished` row, or what the render made

Whatever a handler raises fails that job alone: a `StylebotError` with its message, anything else with a line that
says the engine went wrong (logged with its traceback); a Redis outage puts the job back to be tried again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from engine.pool import OptimisationPool
from engine.services import Services
from storage.records import Job


@dataclass
class Rows:
    """An optimisation: `join` adds the job's row to the pool (the loop calls it between two ticks, when the pool has
    room); `context` is what storing the result needs."""

    join: Callable[[OptimisationPool], None]
    context: dict = field(default_factory=dict)
    answered: bool = False              # answered first already (an encoder's face): waiting for its row, it does not
                                        # hold back the claims of new jobs, whose first answers come first


@dataclass
class OnePass:
    """Work done without optimising: `render` (blocking, the loop runs it in a thread) renders the next part and
    returns None while parts remain, else the outcome. With `at_once` it is rendered whole as soon as it is ready,
    beside a running tick (a stronger / weaker: one forward pass); else one part between two ticks (a morph: many
    frames), so that neither waits for the other."""

    render: Callable[[], Any]
    at_once: bool = True
    context: dict = field(default_factory=dict)


Work = Rows | OnePass


class Handler(Protocol):
    """One kind of job (see the module's docstring); `HANDLERS` in `engine.handlers` finds it by the job's op."""

    async def prepare(self, job: Job, s: Services) -> Work | None:
        """What the job needs, or None after answering it with the reason it cannot run."""

    async def store(self, job: Job, s: Services, work: Work, outcome: Any) -> None:
        """Store the result and answer (guarded by the user's epoch: `Services.finish`)."""
