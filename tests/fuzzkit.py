"""The unit tests' share of a fuzz target, made from its registry entry (``bench.fuzz_targets``).

``make fuzz`` runs each target on 100,000 inputs; ``make test`` runs it on a few hundred, in the
test module of the decoder it fuzzes, as one line::

    test_fuzz_log, test_fuzz_log_raw_bytes = fuzz_tests("log")

The first feeds structurally valid inputs, mutated (the target's generator, driven by hypothesis);
the second raw bytes. Either fails on anything but the project errors the target allows, and on an
acceptance its invariant forbids (see ``bench.fuzz.check_input``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_targets import fuzz_one, targets_by_name

DEFAULT_EXAMPLES = 150
"""Inputs per test (each target has two): a few seconds a module."""
RAW_MAX_BYTES = 2048
"""Largest raw input: past the headers every decoder checks first."""


def fuzz_tests(target: str, *, examples: int = DEFAULT_EXAMPLES) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two tests of ``target``: ``test_fuzz_<target>`` (mutated valid inputs) and
    ``test_fuzz_<target>_raw_bytes``."""
    what = targets_by_name()[target].what      # an unknown name fails at import, not silently
    name = "test_fuzz_" + target.replace("-", "_")
    fuzz = settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    def mutated(rng: random.Random) -> None:
        fuzz_one(target, rng)

    def raw_bytes(data: bytes) -> None:
        fuzz_one(target, data)

    mutated.__doc__ = f"{what}: structurally valid inputs, mutated, let out only project errors."
    raw_bytes.__doc__ = f"{what}: raw bytes let out only project errors."
    fns: tuple[Callable[..., None], ...] = (mutated, raw_bytes)
    for fn, fn_name in zip(fns, (name, name + "_raw_bytes"), strict=True):
        fn.__name__ = fn.__qualname__ = fn_name
        # hypothesis keys its example database by the function's source, the same for every target
        # here: the test's name keeps each one's saved failures its own
        setattr(fn, "_hypothesis_internal_add_digest", fn_name.encode())  # noqa: B010
    return (fuzz(given(st.randoms(use_true_random=False))(mutated)),
            fuzz(given(st.binary(max_size=RAW_MAX_BYTES))(raw_bytes)))
