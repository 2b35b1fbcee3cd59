"""The gradient-inversion audit: its image-quality measures, and the ordering the audit exists to show
(a real chest X-ray rebuilt from one image's gradient without DP, not with DP)."""
from __future__ import annotations

import pytest
import torch

from sitekit.classification import ImageSet, bce_loss, build_cnn, to_unit
from sitekit.inversion import Setting, match_and_score, psnr, run_audit, ssim


@pytest.fixture(scope="module")
def xrays(pneumonia_pool):
    torch.set_num_threads(1)
    return ImageSet("hospital-a", pneumonia_pool["hospital-a"], "train")


def test_psnr_and_ssim(xrays):
    real = to_unit(xrays.x[:4])
    assert float(psnr(real, real).min()) > 100 and torch.allclose(ssim(real, real), torch.ones(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    noisy = (real + 0.1 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    noisier = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    assert (psnr(real, noisy) > psnr(real, noisier)).all() and (ssim(real, noisy) > ssim(real, noisier)).all()
    mse = ((real - noisy) ** 2).flatten(1).mean(1).double()
    torch.testing.assert_close(psnr(real, noisy), -10 * torch.log10(mse))
    # MONAI's SSIM (an independent implementation with the same window and constants) agrees
    from monai.metrics import SSIMMetric

    ref = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)(noisy, real)
    torch.testing.assert_close(ssim(real, noisy), ref.reshape(-1).double(), atol=2e-3, rtol=0)


def test_reconstructions_are_matched_to_their_real_images(xrays):
    real = to_unit(xrays.x[:3])
    shuffled = real[torch.tensor([2, 0, 1])]
    ordered, p, q = match_and_score(real, shuffled)
    assert torch.equal(ordered, real) and (p > 100).all() and (q > 0.999).all()


def test_one_image_leaks_without_dp_and_not_with_dp(xrays):
    """Batch size 1 on the federation's initial model (round 1's update), 300 iterations: without DP
    the attack rebuilds the X-ray far better than the site's mean image does; with DP-SGD (σ = 1,
    C = 1) the reconstruction is noise, far worse than the mean image."""
    model = build_cnn(seed=0)
    settings = [Setting("no-dp", "none"), Setting("dp-sgd", "dp-sgd", noise_multiplier=1.0, clip=1.0)]
    report, pictures = run_audit(model, bce_loss(), xrays.x[5:6], xrays.y[5:6], xrays.x.mean(0, keepdim=True),
                                 settings, [1], iterations=300, to_unit=to_unit, seed=0, progress=lambda line: None)
    plain, private = report["rows"]
    assert plain["label_inferred_correctly"]  # the label read off the last bias's gradient
    assert plain["psnr"] > private["psnr"] + 10
    assert plain["psnr"] > plain["baseline_psnr"] + 3 and plain["ssim"] > 0.8 and plain["leaks"]
    assert private["psnr"] < private["baseline_psnr"] and not private["leaks"]
    real, rebuilt = pictures["b1-no-dp"]
    assert torch.equal(real, to_unit(xrays.x[5:6])) and rebuilt.shape == real.shape
