"""Run a snippet twice in fresh interpreters, compiled by Numba and as plain Python
(NUMBA_DISABLE_JIT=1), so that a test can check the kernels' bodies mean the same either way."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def outputs_with_and_without_jit(code: str) -> tuple[str, str]:
    """What `code` prints when compiled and when interpreted."""
    outs = []
    for disable in ("0", "1"):
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                             env=dict(os.environ, NUMBA_DISABLE_JIT=disable),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout)
    return outs[0], outs[1]
