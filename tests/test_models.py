"""Models build by name, produce logits of the right shape, and are accepted by Opacus."""

import pytest
import torch
from opacus.validators import ModuleValidator

from common.models import MODELS, build_model
from common.names import MODELS as MODEL_NAMES


def test_registry_matches_names():
    assert tuple(MODELS) == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_features", [40, 64])
def test_shapes_and_opacus_compatibility(name, num_features):
    model = build_model(name, num_features, 10)
    assert model(torch.randn(7, num_features)).shape == (7, 10)
    assert ModuleValidator.validate(model, strict=False) == []


def test_seeded_initialisation_is_reproducible():
    a = build_model("cnn1d", 40, 10, seed=3).state_dict()
    b = build_model("cnn1d", 40, 10, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
