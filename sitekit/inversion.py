"""Gradient-inversion audit: how much of a site's training images can be rebuilt from what it shares.

The attack is "inverting gradients" — Geiping, Bauermeister, Dröge, Moeller, "Inverting
Gradients: How easy is it to break privacy in federated learning?", NeurIPS 2020. Given the
update g a site shares for one batch (B images) and the model it was computed on, find images
x̂ whose gradient points the same way:

    x̂ = argmin_x  1 − <∇_θ L(x, y), g> / (||∇_θ L(x, y)|| ||g||)  +  α · TV(x),   x ∈ [−1, 1]

by Adam on signed gradients (step 0.1, divided by 10 at 3/8, 5/8 and 7/8 of the iterations),
keeping the best of a few random starts by the matching loss (the attacker can compute it; it
never sees the real images). Labels: for one image the label is read off the sign of the last
bias's gradient (Zhao et al. 2020, iDLG); for larger batches the attacker is assumed to know
them, as in Geiping et al. — the strong attacker an audit should assume.

What is attacked is what would leave the site for one step on that batch:
- ``none``: the mean gradient (FedSGD; one local step of FedAvg gives the same direction);
- ``dp-sgd``: each example's gradient clipped to C, summed, plus N(0, σ²C²), divided by B —
  one step of :mod:`sitekit.privacy.dpsgd`;
- ``client-dp``: the one-step update −η·g clipped to S, plus N(0, (zS)²) if the noise is added
  at the site; with the noise at the server, the aggregator sees the clipped update unnoised.

Reconstructions are matched to the real images (best assignment by PSNR) and scored with
PSNR and SSIM (Wang et al. 2004, 11x11 Gaussian window, σ 1.5) on [0, 1] intensities. The
baseline is what an attacker knows without any update: the site's mean training image. A
setting *leaks* when its reconstructions beat that baseline clearly (mean PSNR gain
≥ :data:`LEAK_PSNR_GAIN_DB` dB, or SSIM gain ≥ :data:`LEAK_SSIM_GAIN`).

Everything here runs inside the site's process; the images never leave it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

LEAK_PSNR_GAIN_DB = 3.0
LEAK_SSIM_GAIN = 0.2


# --------------------------------------------------------------------------- image quality

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB; x, y [B, C, H, W] in [0, data_range]."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), mean over the valid region; x, y [B, 1, H, W]."""
    x, y = x.double(), y.double()
    w = _gaussian_window(min(window, x.shape[-1], x.shape[-2]), sigma)
    conv = lambda t: torch.nn.functional.conv2d(t, w)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation, mean absolute difference of neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


# --------------------------------------------------------------------------- what a site shares

@dataclass(frozen=True)
class Setting:
    """One way a site could share its update (see the module docstring)."""

    name: str  # label in the report and metric key, e.g. "no-dp", "dp-sgd"
    kind: str  # none | dp-sgd | client-dp
    noise_multiplier: float = 0.0
    clip: float = 0.0  # dp-sgd: max_grad_norm; client-dp: clip_norm
    noise_at: str = "site"  # client-dp
    learning_rate: float = 0.001  # client-dp: one local step's size


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def shared_update(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, setting: Setting,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """The update (per parameter) a site would send for one step on the batch (x, y)."""
    params = _params(model)
    if setting.kind == "none":
        return [g.detach() for g in torch.autograd.grad(loss_fn(model(x), y), params)]
    if setting.kind == "dp-sgd":
        total = [torch.zeros_like(p) for p in params]
        for i in range(len(x)):  # per-example gradients, clipped (B <= 64: a loop is clear and cheap here)
            g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
            norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
            scale = min(1.0, setting.clip / (float(norm) + 1e-6))
            total = [a + scale * t.detach() for a, t in zip(total, g)]
        std = setting.noise_multiplier * setting.clip
        return [(a + torch.normal(0.0, std, size=a.shape, generator=generator)) / len(x) for a in total]
    if setting.kind == "client-dp":
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        update = [-setting.learning_rate * t.detach() for t in g]
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in update)))
        scale = min(1.0, setting.clip / norm) if norm > 0 else 1.0
        update = [scale * t for t in update]
        if setting.noise_at == "site":
            std = setting.noise_multiplier * setting.clip
            update = [t + torch.normal(0.0, std, size=t.shape, generator=generator) for t in update]
        return update
    raise ValueError(f"unknown setting kind {setting.kind!r}")


def infer_single_label(model: torch.nn.Module, update: list[torch.Tensor]) -> torch.Tensor:
    """iDLG for one image and one logit (BCE): dL/db = sigmoid(z) − y, so a negative last-bias gradient means y = 1.

    For an update −η·g (client-dp) the sign flips; callers pass gradients, not updates."""
    last_bias = update[-1].reshape(-1)[0]
    return torch.tensor([[1.0 if float(last_bias) < 0 else 0.0]])


# --------------------------------------------------------------------------- the attack

def invert(model: torch.nn.Module, loss_fn: Callable, target: list[torch.Tensor], labels: torch.Tensor,
           shape: tuple[int, ...], iterations: int = 1500, tv_weight: float = 1e-2, lr: float = 0.1,
           restarts: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Images (in the model's input range [−1, 1]) whose gradient matches ``target`` in direction."""
    params = _params(model)
    flat_target = torch.cat([t.reshape(-1) for t in target]).detach()
    t_norm = flat_target.norm()
    best, best_loss = None, math.inf
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    for _ in range(max(1, restarts)):
        x = (torch.rand(shape, generator=generator) * 2 - 1).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(iterations):
            opt.zero_grad()
            g = torch.autograd.grad(loss_fn(model(x), labels), params, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            matching = 1 - (flat * flat_target).sum() / (flat.norm() * t_norm + 1e-12)
            (matching + tv_weight * total_variation(x)).backward()
            x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(-1, 1)
        g = torch.autograd.grad(loss_fn(model(x), labels), params)
        flat = torch.cat([t.reshape(-1) for t in g])
        final = float(1 - (flat * flat_target).sum() / (flat.norm() * t_norm + 1e-12))
        if final < best_loss:
            best, best_loss = x.detach().clone(), final
    return best, best_loss


def match_and_score(real: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Reorder reconstructions to their best-matching real images (Hungarian on PSNR); per-image PSNR and SSIM.

    Both inputs in [0, 1], [B, 1, H, W]."""
    from scipy.optimize import linear_sum_assignment

    b = len(real)
    table = np.array([[float(psnr(real[i:i + 1], recon[j:j + 1])) for j in range(b)] for i in range(b)])
    rows, cols = linear_sum_assignment(-table)
    ordered = recon[torch.as_tensor(cols[np.argsort(rows)])]
    return ordered, psnr(real, ordered).numpy(), ssim(real, ordered).numpy()


def baseline_scores(real: torch.Tensor, mean_image: torch.Tensor) -> tuple[float, float]:
    """PSNR / SSIM of the site's mean training image against each real image: what is known without any update."""
    guess = mean_image.expand_as(real)
    return float(psnr(real, guess).mean()), float(ssim(real, guess).mean())


def leaks(psnr_mean: float, ssim_mean: float, base_psnr: float, base_ssim: float) -> bool:
    return psnr_mean - base_psnr >= LEAK_PSNR_GAIN_DB or ssim_mean - base_ssim >= LEAK_SSIM_GAIN


def run_audit(model: torch.nn.Module, loss_fn: Callable, images: torch.Tensor, labels: torch.Tensor,
              mean_image: torch.Tensor, settings: list[Setting], batch_sizes: list[int], iterations: int,
              to_unit: Callable[[torch.Tensor], torch.Tensor], seed: int | None = None,
              progress: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Attack each setting at each batch size on the first B of ``images``.

    Returns (report: numbers only, safe to leave the site; images: {key: (real, reconstruction)}
    in [0, 1], which must stay at the site)."""
    from sitekit.privacy.dpsgd import secret_generator

    model.eval()  # group norm: same maths; no dropout or running statistics
    noise = secret_generator()
    starts = torch.Generator()
    starts.manual_seed(seed if seed is not None else int(time.time()))
    rows, pictures = [], {}
    for b in batch_sizes:
        x, y = images[:b], labels[:b]
        real = to_unit(x)
        base_psnr, base_ssim = baseline_scores(real, to_unit(mean_image))
        for s in settings:
            t0 = time.perf_counter()
            update = shared_update(model, loss_fn, x, y, s, noise)
            grads = [-u for u in update] if s.kind == "client-dp" else update  # an update is −η·g: same direction as −g
            guess_y = infer_single_label(model, grads) if b == 1 else y
            recon, match_loss = invert(model, loss_fn, grads, guess_y, tuple(x.shape), iterations=iterations,
                                       generator=starts)
            ordered, p, q = match_and_score(real, to_unit(recon))
            row = {"batch_size": b, "setting": s.name, "kind": s.kind, "noise_multiplier": s.noise_multiplier,
                   "clip": s.clip, "noise_at": s.noise_at if s.kind == "client-dp" else ("site" if s.kind == "dp-sgd" else None),
                   "psnr": float(p.mean()), "psnr_max": float(p.max()), "ssim": float(q.mean()),
                   "baseline_psnr": base_psnr, "baseline_ssim": base_ssim, "matching_loss": match_loss,
                   "label_inferred_correctly": bool(torch.equal(guess_y, y)) if b == 1 else None,
                   "seconds": round(time.perf_counter() - t0, 1)}
            row["leaks"] = leaks(row["psnr"], row["ssim"], base_psnr, base_ssim)
            rows.append(row)
            pictures[f"b{b}-{s.name}"] = (real, ordered)
            progress(f"batch {b:>2}, {s.name:<14} PSNR {row['psnr']:6.2f} dB (baseline {base_psnr:5.2f})  "
                     f"SSIM {row['ssim']:.3f} (baseline {base_ssim:.3f})  {'LEAKS' if row['leaks'] else 'no clear leak'}"
                     f"  ({row['seconds']:.0f} s)")
    return {"rows": rows, "leak_rule": {"psnr_gain_db": LEAK_PSNR_GAIN_DB, "ssim_gain": LEAK_SSIM_GAIN}}, pictures


def figure(pictures: dict, rows: list[dict], max_images: int = 8):
    """Real (top) vs reconstructed (below) per setting and batch size; for the site's own folder only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(pictures)
    n = min(max_images, max(len(v[0]) for v in pictures.values()))
    fig = Figure(figsize=(1.2 * n + 2.5, 1.25 * 2 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * len(keys), n, squeeze=False)
    by_key = {f"b{r['batch_size']}-{r['setting']}": r for r in rows}
    for k, key in enumerate(keys):
        real, recon = pictures[key]
        r = by_key[key]
        for j in range(n):
            for i, img in ((2 * k, real), (2 * k + 1, recon)):
                ax = axes[i][j]
                ax.axis("off")
                if j < len(img):
                    ax.imshow(img[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2 * k][0].set_title(f"batch {r['batch_size']}, {r['setting']}: real", fontsize=7, loc="left")
        axes[2 * k + 1][0].set_title(f"reconstructed: PSNR {r['psnr']:.1f} dB, SSIM {r['ssim']:.2f}"
                                     f"{'  LEAKS' if r['leaks'] else ''}", fontsize=7, loc="left")
    fig.tight_layout()
    return fig
