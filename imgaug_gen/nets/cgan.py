"""Class-conditional GAN networks (BigGAN/SNGAN style, sized for few-shot data).

Generator: noise -> 4x4 -> residual up-blocks with class-conditional batch norm
(per-class gain and bias) -> image in [-1, 1]. Discriminator: spectrally
normalised residual down-blocks, global sum pooling, an unconditional logit plus
the projection term <embed(y), h> (Miyato & Koyama, 2018), and optionally a
second, purely unconditional head on the same features for images without a
label. Both work at any power-of-two size >= 8 and with 1 or 3 channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


def num_blocks(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2
    if image_size < 8 or 2 ** (n + 2) != image_size:
        raise ValueError(f"`image_size` must be a power of two >= 8 for the cGAN, got {image_size}.")
    return n


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class CGANGenerator(nn.Module):
    def __init__(self, num_classes: int, image_size: int = 32, channels: int = 1, z_dim: int = 64, width: int = 64):
        super().__init__()
        self.z_dim, self.width = z_dim, width
        n = num_blocks(image_size)
        chans = [width * min(2 ** (n - i), 4) for i in range(n + 1)]
        self.fc = nn.Linear(z_dim, 4 * 4 * chans[0])
        self.blocks = nn.ModuleList(GBlock(chans[i], chans[i + 1], num_classes) for i in range(n))
        self.out_bn = nn.BatchNorm2d(chans[-1])
        self.out = nn.Conv2d(chans[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.out_bn(h))))


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, downsample: bool = True, first: bool = False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        s = self.skip(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class ProjectionDiscriminator(nn.Module):
    """``unconditional_head=True`` adds ``uncond``: real vs fake for any image, labelled or not, from the
    features the projection term reads (:meth:`both`)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        channels: int = 1,
        width: int = 64,
        unconditional_head: bool = False,
    ):
        super().__init__()
        n = num_blocks(image_size)
        chans = [channels] + [width * min(2**i, 4) for i in range(n)]
        self.blocks = nn.Sequential(*(DBlock(chans[i], chans[i + 1], first=(i == 0)) for i in range(n)))
        self.final = DBlock(chans[-1], chans[-1], downsample=False)
        self.linear = spectral_norm(nn.Linear(chans[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, chans[-1]))
        self.uncond = spectral_norm(nn.Linear(chans[-1], 1)) if unconditional_head else None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.final(self.blocks(x))).sum(dim=[2, 3])

    def _projection(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._projection(self._features(x), y)

    def both(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional logits (labels ``y``) and the unconditional head's, from one pass of the trunk."""
        if self.uncond is None:
            raise RuntimeError("this discriminator was built without `unconditional_head`")
        h = self._features(x)
        return self._projection(h, y), self.uncond(h).squeeze(1)
