"""What a page-sampling change-rate reading may read, for tests of the simulator."""

from __future__ import annotations

import math

from lmwatch.drivers.simphysics import SAMPLE_PAGES_PER_GIB

MIB = 2**20


def page_sampling_spread(rate: float, seconds: float, memory: int, sigmas: float = 4.0) -> float:
    """How far (bytes/s) a reading of a guest that dirties `rate` distinct bytes per
    second may land from it: `sigmas` standard deviations of the binomial count of
    changed pages among those sampled, plus the whole MiB/s it is rounded to."""
    samples = max(1, round(SAMPLE_PAGES_PER_GIB * memory / 2**30))
    share = min(1.0, rate * seconds / memory)
    deviation = math.sqrt(samples * share * (1.0 - share)) / samples * memory / seconds
    return sigmas * deviation + MIB
