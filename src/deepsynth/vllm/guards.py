"""The Decoder's loop guards as one vLLM (v1) logits processor, so vLLM answers as transformers does.

`deepsynth.models.generate.Decoder` decodes with transformers' `no_repeat_ngram_size` (over the
whole sequence, prompt included), `suppress_tokens` (the image token) and `LoopStop` (a row whose
new tokens end in a repeated cycle stops there). vLLM's own DeepSeek-OCR n-gram processor looks
only at a window of the answer, so this module re-states transformers' rules instead:

* n-gram blocking: a token that would repeat an n-gram already in prompt + answer is banned;
* suppression: the listed token ids are banned;
* loop stop: once the answer ends in a loop (`deepsynth.models.loops.find_loop`, same policy and
  window as `LoopStop`), the end-of-sequence token is forced. The engine then drops that EOS and
  reports `stopped="loop"` with the repeats cut, as the Decoder does.

A request opts in through `SamplingParams.extra_args[GUARDS_KEY]` (see `guard_args`).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from deepsynth.models.loops import LoopPolicy, find_loop

GUARDS_KEY = "deepsynth_guards"


def guard_args(no_repeat_ngram_size: int, suppress: list[int], eos_token_id: int | None,
               loop_policy: LoopPolicy | None) -> dict:
    """`extra_args` entry of a request (loop_policy None: no loop stop)."""
    loop = None if loop_policy is None else [loop_policy.min_span, loop_policy.min_repeats, loop_policy.max_period]
    return {GUARDS_KEY: {"ngram": int(no_repeat_ngram_size), "suppress": [int(t) for t in suppress],
                         "eos": eos_token_id, "loop": loop}}


class RequestGuards:
    """The guards of one request; called by vLLM with (prompt ids, answer ids so far, logits)."""

    def __init__(self, ngram: int, suppress: list[int], eos: int | None, loop: list[int] | None) -> None:
        self.n = ngram
        self.suppress = list(suppress)
        self.eos = eos
        self.policy = LoopPolicy(*loop) if loop else None
        self.window = (max(512, self.policy.min_span, self.policy.min_repeats * self.policy.max_period)
                       if self.policy else 0)
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.indexed = 0  # n-grams ending before this position of prompt + answer are in `seen`

    def _index(self, tokens: list[int]) -> None:
        n = self.n
        for end in range(max(self.indexed, n), len(tokens) + 1):
            self.seen.setdefault(tuple(tokens[end - n:end - 1]), set()).add(tokens[end - 1])
        self.indexed = len(tokens) + 1

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.policy is not None and self.eos is not None and len(output_ids) >= self.policy.min_span:
            if find_loop(output_ids[-self.window:], self.policy) is not None:
                keep = logits[self.eos].clone()
                logits.fill_(float("-inf"))
                logits[self.eos] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
                return logits
        if self.n > 0:
            tokens = list(prompt_ids) + list(output_ids)
            if len(tokens) + 1 >= self.n:
                self._index(tokens)
                banned = self.seen.get(tuple(tokens[len(tokens) + 1 - self.n:]), ())
                if banned:
                    logits[list(banned)] = float("-inf")
        if self.suppress:
            logits[self.suppress] = float("-inf")
        return logits


class DeepsynthGuards(AdapterLogitsProcessor):
    """vLLM logits processor applying `RequestGuards` to the requests that ask for them."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        args = (params.extra_args or {}).get(GUARDS_KEY)
        if args is None:
            return
        if not isinstance(args.get("ngram"), int) or args["ngram"] < 0:
            raise ValueError(f"{GUARDS_KEY}.ngram must be an integer >= 0, got {args.get('ngram')!r}")
        if args.get("loop") is not None:
            LoopPolicy(*args["loop"])

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        args = (params.extra_args or {}).get(GUARDS_KEY)
        if args is None:
            return None
        return RequestGuards(args["ngram"], args.get("suppress") or [], args.get("eos"), args.get("loop"))
