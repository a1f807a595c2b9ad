"""Settings and shared fixtures for the whole suite. Hypothesis draws the same examples on
every run; `digits` is the data set most tests learn from. (Helpers that are not fixtures
live beside this file: cluster.py, deadline.py, bits.py, certs.py, jit.py, twins/.)

Property tests search for counterexamples; left to their defaults they search anew each run,
so a suite could pass today and fail tomorrow on the same code. Derandomized, a failure
reproduces, and a new search happens only when a test changes.
"""

import pytest
from hypothesis import settings

settings.register_profile("tinyps", derandomize=True, database=None)
settings.load_profile("tinyps")


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as load_dataset("digits") gives them (seed 0, standardised).

    Module scope, as before it moved here: a test that writes into the arrays spoils only its
    own file.
    """
    from worker.data import load_dataset  # here: collecting the suite needs no data modules

    return load_dataset("digits")
