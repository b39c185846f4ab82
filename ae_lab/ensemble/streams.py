"""Each member's own random stream: the draws a single run with its seed makes, in that run's order.

A single run draws from torch's global generator, seeded by `seed` and advanced by the model's
initialisation: in each step the corruption, the VAE's reparameterisation and the contractive
estimator's projections, and, when the data set resamples binary pixels, each batch as it is fetched.
Under vmap those draws would come from one generator for the whole group. Instead, the ensemble keeps
every member's generator state (`MemberStreams`), and a step's draws are made member by member in that
member's stream, outside vmap, then handed to the vmapped step, where `Replay` returns them in place of
the draws it would make. Which draws a step makes (functions and shapes, the same for every member and
every batch of one size) is recorded once by running the step for one member (`record`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from ae_lab.checkpoints import random_state, set_random_state


def _requested_shape(function: Callable[..., torch.Tensor], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> torch.Size:
    """The shape of what a DRAWING call asks for: its template's (`*_like`), else its size."""
    if function in (torch.randn_like, torch.rand_like):
        return args[0].shape
    size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
    return torch.Size(size)


# What ae_lab's training and evaluation steps draw with (noise kinds, the Gaussian head, the projection
# estimator); a `*_like` call is replayed from a template of the same shape and dtype. A step that drew
# with another function would still train, that draw made by vmap from the global generator for the
# whole group (in distribution, not its single run's number): add the function here.
DRAWING = {torch.randn_like, torch.rand_like, torch.randn, torch.rand}


@dataclass
class Draw:
    """One random call of a step: the function and what it was called with."""

    function: Callable[..., torch.Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    shape: torch.Size

    def __call__(self) -> torch.Tensor:
        return self.function(*self.args, **self.kwargs)


class _Record(TorchFunctionMode):
    """Records the random calls made under it (and makes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if function in DRAWING:
            shape = _requested_shape(function, args, kwargs)
            # a `_like` call's tensor stands for its shape, dtype and device only
            template = tuple(torch.empty_like(a) if isinstance(a, torch.Tensor) else a for a in args)
            self.draws.append(Draw(function, template, kwargs, shape))
        return function(*args, **kwargs)


class Replay(TorchFunctionMode):
    """Inside the vmapped step: returns the given draws, in order, in place of the step's random calls.
    A call other than the recorded one (another function or shape) is a bug: it raises."""

    def __init__(self, plan: list[Draw], draws: list[torch.Tensor]) -> None:
        super().__init__()
        self.plan, self.draws, self.next = plan, draws, 0

    def __torch_function__(self, function, types, args=(), kwargs=None):
        if function not in DRAWING:
            return function(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        expected = self.plan[self.next] if self.next < len(self.plan) else None
        if expected is None or expected.function is not function or \
                _requested_shape(function, args, kwargs) != expected.shape:
            raise RuntimeError(f"the ensemble's step drew {function.__name__} where its recorded draws have "
                               f"{expected.function.__name__ if expected else 'none'}")
        self.next += 1
        return self.draws[self.next - 1]


class MemberStreams:
    """The generator states of M members (CPU, and the current GPU's), each advanced only by its own draws."""

    def __init__(self, states: list[dict[str, torch.Tensor | None]]) -> None:
        self.states = states

    def in_each(self, make: Callable[[int], Any], members: range | list[int]) -> list[Any]:
        """`make(member)` for each member, with that member's stream as torch's global generator (the
        global one set aside meanwhile)."""
        made = []
        outside = random_state()
        try:
            for member in members:
                set_random_state(self.states[member])
                made.append(make(member))
                self.states[member] = random_state()
        finally:
            set_random_state(outside)
        return made

    @staticmethod
    def record(step: Callable[[], Any]) -> list[Draw]:
        """The random calls `step()` makes (run once, its draws from a throwaway copy of the global stream)."""
        outside = random_state()
        recorder = _Record()
        try:
            with recorder:
                step()
        finally:
            set_random_state(outside)
        return recorder.draws

    def draw(self, plan: list[Draw], members: range | list[int]) -> list[torch.Tensor]:
        """`plan`'s draws made in each member's stream, each stacked over the members: (M, *shape)."""
        if not plan:
            return []
        made = self.in_each(lambda member: [draw() for draw in plan], members)
        return [torch.stack(column) for column in zip(*made)]
