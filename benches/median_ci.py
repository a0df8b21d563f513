"""The bootstrap 95% interval of a median, shared by the bench scripts' summaries.

A run gives one ratio per round (loadtape over nginx, a build over another); on a VM that
drifts by several percent between rounds, the interval says how far the median of those
ratios could itself be off. Resampled with a fixed seed, so that the same rounds always give
the same interval.
"""
import random
import statistics


def median_ci(values, draws=10000, seed=1):
    """(low, high): the 2.5th and 97.5th percentiles of the medians of `draws` resamples."""
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(draws)
    )
    return medians[draws * 25 // 1000], medians[draws * 975 // 1000 - 1]
