"""Purified models shared by test_io and test_export, built once per test session.

Each case is a ResNet with BatchNorm statistics calibrated on random images (realistic
activations), purified at ``layer4`` (8 neurons) and ``layer3.1`` (3 neurons) on images of the odd
size 97x131, with three virtual neurons of ``layer4`` suppressed: both of channel 8 (so the
logits change whatever the gates) and 16.1 (so the merge depends on the gate).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

import purenn

from conftest import adapted_stem_resnet, make_model

SIZE = (97, 131)
CASES = ("resnet18", "resnet50", "resnext50_32x4d", "adapted_stem")
#: the cases the default test run leaves to ``-m slow`` (the most expensive; resnet50 stays as the deep model)
SLOW = ("resnext50_32x4d", "adapted_stem")
#: CASES as pytest parameters, the SLOW ones marked slow
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
NEURONS = {"layer4": list(range(0, 64, 8)), "layer3.1": [1, 2, 3]}
SUPPRESSED = ((8, 0), (8, 1), (16, 1))  # (channel, cluster) of the suppressed virtual neurons of layer4


def images(n: int, seed: int, c: int = 3, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.rand(n, c, *size, generator=torch.Generator().manual_seed(seed))


def base_model(name: str) -> nn.Module:
    if name == "adapted_stem":
        return adapted_stem_resnet(in_ch=3)
    return make_model(name, size=SIZE)


@cache
def purified(name: str) -> tuple[nn.Module, purenn.PurifiedModel]:
    """``(base model, purified model)``; do not change them (use ``with pm.suppress(...)``)."""
    model = base_model(name)
    pm = purenn.purify_model(model, ["layer4", "layer3.1"], images(10, seed=3), n_refs=4, progress=False,
                             neurons=NEURONS)
    pm.suppress("layer4", [pm.virtual_index("layer4", c, k) for c, k in SUPPRESSED])
    return model, pm
