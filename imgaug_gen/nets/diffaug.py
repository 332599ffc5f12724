"""DiffAugment (Zhao et al., 2020): differentiable colour, translation and cutout
applied to both real and fake images before the discriminator, the
data-efficient-GAN recipe that keeps the discriminator from memorising a small
training set. Random draws come from the given ``torch.Generator`` (or the global
one), so a run is reproducible and resumable."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _rand(n, *shape, generator, device):
    return torch.rand(n, *shape, generator=generator, device=device)


def _color(x, generator):
    n = x.shape[0]
    x = x + (_rand(n, 1, 1, 1, generator=generator, device=x.device) - 0.5)
    if x.shape[1] > 1:  # saturation is meaningless for one channel
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand(n, 1, 1, 1, generator=generator, device=x.device) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - mean) * (_rand(n, 1, 1, 1, generator=generator, device=x.device) + 0.5) + mean
    return x


def _translation(x, generator, ratio=0.125):
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=generator, device=x.device)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), generator=generator, device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x, generator, ratio=0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=generator, device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=generator, device=x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(ch, device=x.device),
        torch.arange(cw, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(
    x: torch.Tensor,
    policy: Sequence[str] = POLICIES,
    generator: torch.Generator | None = None,
    p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Apply the named DiffAugment ops in order; gradients flow through.

    ``p`` < 1 applies each op to each image with probability ``p`` (ADA's augmentation
    probability, Karras et al. 2020); ``p`` = 1 is plain DiffAugment."""
    p = float(p)
    if p <= 0:
        return x
    for name in policy:
        y = _OPS[name](x, generator)
        if p < 1:
            keep = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) < p
            y = torch.where(keep, y, x)
        x = y
    return x.contiguous()


class AdaptiveAugmentProbability:
    """ADA's overfitting heuristic (Karras et al. 2020): ``r_t = E[sign(D(real))]`` over the last
    ``interval`` discriminator steps; ``p`` moves by ``sign(r_t - target) * batch * interval /
    (speed_images)`` after each interval, clamped to [0, 1]. ``p`` starts at 0."""

    def __init__(self, target: float = 0.6, interval: int = 4, speed_images: int = 500_000 // 100) -> None:
        self.target, self.interval, self.speed_images = float(target), int(interval), int(speed_images)
        self.p = 0.0
        self._signs: list[float] = []
        self._count = 0

    def update(self, real_logits: torch.Tensor) -> float:
        """Record one discriminator step's real logits; returns the (possibly adjusted) ``p``."""
        self._signs.append(float(torch.sign(real_logits.detach()).mean()))
        self._count += real_logits.shape[0]
        if len(self._signs) >= self.interval:
            r_t = sum(self._signs) / len(self._signs)
            step = self._count / self.speed_images
            self.p = min(1.0, max(0.0, self.p + (step if r_t > self.target else -step)))
            self._signs, self._count = [], 0
        return self.p

    def state_dict(self) -> dict:
        return {"p": self.p, "signs": list(self._signs), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self.p, self._signs, self._count = float(state["p"]), list(state["signs"]), int(state["count"])
