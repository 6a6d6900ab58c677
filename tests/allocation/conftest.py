"""Session fixtures for the allocation tests (helpers live in allocation_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from allocation_helpers import ara_cap, decay_spectrum, llama_names, one_thread, tiny_llama

from lowrank_infer.calibration import calibrate
from lowrank_infer.factorize import Spectrum, whitened_svd
from lowrank_infer.structure import target_linears


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def synthetic_spectra() -> dict[str, Spectrum]:
    """Four tiny-Llama blocks; each layer's decay varies with depth so effective ranks differ."""
    spectra = {}
    with one_thread():
        for j, (name, (m, n)) in enumerate(llama_names(4).items()):
            depth = int(name.split(".")[2])
            spectra[name] = decay_spectrum(m, n, 0.80 + 0.05 * depth, seed=j, max_rank=ara_cap(m, n))
    return spectra


@pytest.fixture(scope="session")
def tiny_model_and_spectra():
    """A tiny GQA Llama, calibration ids, and its whitened spectra with ARA-sized factors."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    linears = target_linears(model)
    with one_thread():
        grams = calibrate(model, ids, linears, batch_size=4, progress=False)
        spectra = {
            name: whitened_svd(m.weight, grams[name], max_rank=ara_cap(m.out_features, m.in_features), name=name)
            for name, m in linears.items()
        }
    return model, ids, spectra
