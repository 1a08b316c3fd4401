"""On a CUDA GPU (``pytest -m gpu``; skipped elsewhere, saying so): the image DiT reproduces
the official output there too, the fast path (bf16 autocast, ``torch.compile``) stays close to
it, and a CellDiT trains on the GPU (Lightning, bf16-mixed) and samples as it does on the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_cell_models import FIT, N_CTRL, SHIFTED, build, counterfactual, planted_adata

from celldit.bench.image import _tf32
from celldit.models import load_official_checkpoint

pytestmark = pytest.mark.gpu

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official_dit_tiny.pt"


@pytest.fixture(scope="module")
def official():
    fixture = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    model = load_official_checkpoint(str(FIXTURE))
    inputs = tuple(fixture[k].cuda() for k in ("x", "t", "y"))
    return model.cuda().eval(), inputs, fixture["out"].cuda()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_official_output_reproduced_on_cuda_in_fp32(official):
    model, inputs, expected = official
    with _tf32(False), torch.no_grad():  # true fp32: the fixture's precision
        out = model(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_bf16_autocast_and_compile_stay_close_to_the_official_output(official):
    model, inputs, expected = official
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(*inputs)
    err = _relative_error(bf16, expected)
    assert 0 < err < 2e-2, err  # bf16 rounds (so not exact), but only at its ~3 significant digits
    compiled = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        out = compiled(*inputs)
    assert _relative_error(out, expected) < 1e-4  # fp32: fused kernels reorder sums, no more


def test_cell_model_trains_on_cuda_and_samples_as_on_cpu():
    planted = planted_adata()
    trainer = {**FIT["trainer"], "accelerator": "gpu", "precision": "bf16-mixed"}
    model = build(planted, source="control", anchor=False).fit(max_steps=300, lr=2e-3, **{**FIT, "trainer": trainer})
    losses = np.asarray(model.history["losses"])
    assert np.isfinite(losses).all() and losses[-50:].mean() < 0.5 * losses[:20].mean()
    model.to("cuda")
    ctrl = planted[:N_CTRL]
    on_gpu = counterfactual(model, ctrl, "P").X
    # the planted response on genes 0-3 is +3 in half the cells: the mean moves by about 1.5
    shift = on_gpu[:, SHIFTED].mean(0) - np.asarray(ctrl.X[:, SHIFTED]).mean(0)
    assert np.all(np.abs(shift - 1.5) < 0.5), shift
    # the same weights on the CPU give the same flow output (fp32 sampling on both; the raw output,
    # since the support step rounds and ranks, where a difference in the last bit can flip a value)
    raw_gpu = counterfactual(model, ctrl, "P", support="none").X
    raw_cpu = counterfactual(model.to("cpu"), ctrl, "P", support="none").X
    np.testing.assert_allclose(raw_gpu, raw_cpu, atol=1e-3)
