"""Generation-loop guards: detect an answer that ends in a repeated n-gram cycle.

Users of OCR-style models report outputs that repeat a phrase until the token limit. Two guards
work together (see `InstructionEngine`): transformers' `no_repeat_ngram_size` forbids long exact
repeats while decoding, and `LoopStop` ends a row as soon as its new tokens end in a short cycle
repeated enough times (which n-gram blocking alone does not prevent: "aaaa..." or "ab ab ab").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria


@dataclass(frozen=True)
class LoopPolicy:
    """When a repeated tail counts as a loop.

    A tail made of a cycle of `period` tokens counts as a loop when it spans at least
    `min_span` tokens AND holds at least `min_repeats` full copies of the cycle, for a period of
    at most `max_period` tokens. Defaults: 24 identical tokens in a row, or any cycle of up to 64
    tokens seen 3 times (a 40-token sentence repeated three times is a loop; "1000000" is not).
    """

    min_span: int = 24
    min_repeats: int = 3
    max_period: int = 64

    def __post_init__(self) -> None:
        if self.min_span < 2 or self.min_repeats < 2 or self.max_period < 1:
            raise ValueError(f"LoopPolicy needs min_span >= 2, min_repeats >= 2, max_period >= 1, got {self}")


def find_loop(ids: Sequence[int], policy: LoopPolicy = LoopPolicy()) -> tuple[int, int] | None:
    """(start, period) of the repeated cycle that `ids` ends in, or None.

    `start` is where the periodic tail begins: `ids[start:start + period]` is one copy of the
    cycle, and everything from `start` on repeats it. The smallest qualifying period wins.
    """
    n = len(ids)
    for period in range(1, min(policy.max_period, n // policy.min_repeats) + 1):
        # length of the tail in which every token equals the token `period` places before it
        run = 0
        while run < n - period and ids[n - 1 - run] == ids[n - 1 - run - period]:
            run += 1
        span = run + period
        if span >= policy.min_span and span >= policy.min_repeats * period:
            return n - span, period
    return None


def trim_loop(ids: Sequence[int], policy: LoopPolicy = LoopPolicy()) -> tuple[list[int], bool]:
    """`ids` with a trailing loop cut to one copy of its cycle, and whether a loop was found."""
    found = find_loop(ids, policy)
    if found is None:
        return list(ids), False
    start, period = found
    return list(ids[:start + period]), True


class LoopStop(StoppingCriteria):
    """Stops each row of a `generate` batch whose new tokens end in a loop (see `find_loop`).

    prompt_length: width of the (padded) prompt; only tokens after it are checked.
    """

    def __init__(self, prompt_length: int, policy: LoopPolicy = LoopPolicy(), window: int = 512) -> None:
        self.prompt_length = prompt_length
        self.policy = policy
        self.window = max(window, policy.min_span, policy.min_repeats * policy.max_period)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length:]
        if new.shape[1] < self.policy.min_span:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tail = new[:, -self.window:].tolist()
        done = [find_loop(row, self.policy) is not None for row in tail]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CancelStop(StoppingCriteria):
    """Stops the whole batch once `event` is set (a client went away, the server shuts down)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.event.is_set():
            self.fired = True
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)
