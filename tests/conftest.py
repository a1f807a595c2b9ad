"""Settings for the whole suite: Hypothesis draws the same examples on every run.

Property tests search for counterexamples; left to their defaults they search anew each run,
so a suite could pass today and fail tomorrow on the same code. Derandomized, a failure
reproduces, and a new search happens only when a test changes.
"""

from hypothesis import settings

settings.register_profile("tinyps", derandomize=True, database=None)
settings.load_profile("tinyps")
