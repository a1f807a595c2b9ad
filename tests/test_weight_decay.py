"""Weight decay (coupled L2, as torch.optim.SGD and Adam's weight_decay; decoupled, as AdamW's)
and a schedule, through the Optimizer that the baseline steps and through a server's store,
against torch 2.13.0's results (stored: torch is not a test dependency)."""

import numpy as np
import pytest
from bits import assert_same_bits, hex32
from test_optim import P0, TORCH_GRADS

from ps.keys import Key
from ps.optimizer import Optimizer, OptimizerConfig
from ps.store import Store
from ps.store_config import StoreConfig

# torch 2.13.0 CPU (AVX-512), five steps from P0 with TORCH_GRADS (tests/test_optim.py), float32
# bit patterns; the scheduled run steps SequentialLR([LinearLR(start_factor=0.5,
# total_iters=2), CosineAnnealingLR(T_max=3)], milestones=[2]) after each optimizer step.
SGD_WD = hex32("3e8aaf5f bf87cbcb 3f09fd67 3f786406 bffc30b2 bf9b5805 3dff1a6f beea4b9c bdd6a6a5 "
               "bf4ec82e 3f68b406")  # SGD(lr=0.05, weight_decay=0.01)
MOMENTUM_WD = hex32("3d84ec90 bf8e25eb 3e8e8734 3f6fd37d bfed357f bf9f05ee 3e1ceb3d bf3c82fe "
                    "bead6d86 bf27abfb 3f898265")  # SGD(lr=0.05, momentum=0.9, weight_decay=0.01)
MOMENTUM_WD_BUF = hex32("3e5cdfcc 3e9dac6c 40695b82 bf2b5b64 3f257130 bfeb04ba 3e06331c "
                        "400d14b0 3f9e5a3a bf10a7b1 be637ebc")
ADAM_WD = hex32("3e8d8e7d bf837dc6 3f368e81 3f6c4f4f bff69ac9 bfa799f5 3e0b6303 beb9f931 "
                "bcce4bd6 bf4f6540 3f68a382")  # Adam(lr=0.01, weight_decay=0.1)
ADAM_WD_M = hex32("3d0593b0 bbe49899 3ec8ca0e bd05d5d8 bbe4958d be6d9025 3c93933a 3e5584ed "
                  "3dfd338e bdb2e83b 3c2cd2de")
ADAM_WD_V = hex32("3b533f89 39ff849b 3bd03cd1 3a8d8c00 3b4cd489 3b8d9797 3adff7ce 3ae4fc0a "
                  "3bf0511c 3abb81a3 3acc4a4b")
ADAMW = hex32("3e8d496e bf86f8fc 3f360c9b 3f6d75b1 bff67a23 bfa78296 3e0b7f30 beb94025 "
              "bccdefbb bf4ed925 3f6888e1")  # AdamW(lr=0.01, weight_decay=0.1): decoupled
MOMENTUM_WD_SCHEDULED = hex32("3e0375cd bf8b9eb8 3ef61dcc 3f6d62d0 bfede51c bfa5e02a 3e0a63f6 "
                              "bf1699d1 be844535 bf34b9aa 3f82b437")

CASES = {
    "sgd": (OptimizerConfig("sgd", lr=0.05, weight_decay=0.01), SGD_WD, {}),
    "momentum": (OptimizerConfig("momentum", lr=0.05, momentum=0.9, weight_decay=0.01),
                 MOMENTUM_WD, {"buf": MOMENTUM_WD_BUF}),
    "adam": (OptimizerConfig("adam", lr=0.01, weight_decay=0.1), ADAM_WD,
             {"m": ADAM_WD_M, "v": ADAM_WD_V}),
    "adamw": (OptimizerConfig("adamw", lr=0.01, weight_decay=0.1), ADAMW, {}),
    "scheduled": (OptimizerConfig("momentum", lr=0.05, momentum=0.9, weight_decay=0.01,
                                  lr_schedule="warmup:2:0.5,cosine:3"), MOMENTUM_WD_SCHEDULED, {}),
}
KEY = Key("w", (P0.size,), 0, P0.size)


def _ulps(a, b):
    ia, ib = (np.asarray(x, np.float32).view(np.int32).astype(np.int64) for x in (a, b))
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.max(np.abs(ia - ib)))


def _check(config, param, state, want, want_state):
    for name, bits in want_state.items():
        assert_same_bits(state[name], bits)
    if config.name in ("adam", "adamw"):  # torch's vectorised sqrt is off by one ulp now and then
        assert _ulps(param, want) <= 2
    else:
        assert_same_bits(param, want)


@pytest.mark.parametrize("case", CASES)
def test_the_optimizer_as_the_baseline_steps_it_gives_torchs_weights(case):
    config, want, want_state = CASES[case]
    optimizer = Optimizer(config, {"w": P0.shape})
    param = P0.copy()
    for t, grad in enumerate(TORCH_GRADS):
        optimizer.step("w", param, grad, lr=config.lr_at(t))
    _check(config, param, optimizer.state["w"], want, want_state)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", CASES)
def test_a_server_applying_the_pushes_gives_torchs_weights(case, mode):
    config, want, want_state = CASES[case]
    store = Store(StoreConfig(mode=mode, workers=1))
    store.init([KEY], config, {KEY.id: P0.copy()})
    for t, grad in enumerate(TORCH_GRADS):
        store.push(0, t, {KEY.id: (grad.copy(), t)})
    key = store.snapshot().keys[0]
    _check(config, key.value, key.optimizer, want, want_state)
