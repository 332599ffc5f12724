"""The ddpm kind's network: a diffusers ``UNet2DModel`` with a class embedding sized by the data, and the
geometric transforms of non-leaking augmentation it can be conditioned on."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from diffusers import UNet2DModel

from imgaug_gen.errors import ConfigError
from imgaug_gen.io import jsonable as _plain

# UNet2DModel arguments that come from the data, not from `model.unet`.
_DATA_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds", "class_embed_type")


# -- non-leaking augmentation (EDM, Karras et al. 2022 section 5) ---------------------------------
#: Discrete geometric augmentations the UNet can be conditioned on: index 0 is the identity.
#: "flips": identity, x-flip, y-flip, both; "dihedral": the 8 rotations/reflections of a square.
AUGMENT_GROUPS = {"none": 1, "flips": 4, "dihedral": 8}


def augment_group_size(name: str, image_shape: Sequence[int]) -> int:
    if name not in AUGMENT_GROUPS:
        raise ConfigError(f"`model.augment.ops` = {name!r}; allowed: {sorted(AUGMENT_GROUPS)}.")
    if name == "dihedral" and int(image_shape[1]) != int(image_shape[2]):
        raise ConfigError(
            f"`model.augment.ops=dihedral` rotates by 90 degrees and needs square images; the data's "
            f"are {image_shape[1]}x{image_shape[2]}. Use `model.augment.ops=flips`."
        )
    return AUGMENT_GROUPS[name]


def apply_group_element(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` of the dihedral group on NCHW images: ``k % 4`` quarter turns, then (k >= 4) a
    transpose. With the "flips" group (k < 4) the elements are identity, x-flip, y-flip, both."""
    if k == 0:
        return x
    if k == 1:
        return x.flip(-1)
    if k == 2:
        return x.flip(-2)
    if k == 3:
        return x.flip(-1, -2)
    y = x.transpose(-1, -2)  # k = 4..7: the transpose composed with the four flips
    return apply_group_element(y, k - 4)


def unet_config(
    num_classes: int, image_shape: Sequence[int], unet: Mapping[str, Any] | None = None, augment_classes: int = 1
) -> dict:
    """Full ``UNet2DModel`` arguments: the data's facts plus ``model.unet`` (checked).

    The class embedding has ``(num_classes + 1) * augment_classes`` entries: label ``y`` (or the null
    class ``num_classes``) under augmentation ``k`` is entry ``y + (num_classes + 1) * k``, so the
    un-augmented entries (k = 0) are those of a UNet trained without augmentation conditioning."""
    unet = dict(unet or {})
    given = sorted(set(unet) & set(_DATA_UNET_KEYS))
    if given:
        raise ConfigError(
            f"`model.unet` sets {given}, which come from the data (image size, channels, classes); remove them."
        )
    c, h, w = (int(v) for v in image_shape)
    widths = [int(v) for v in unet.get("block_out_channels", (32, 64, 64))]
    n = len(widths)
    unet.setdefault("block_out_channels", widths)
    unet.setdefault("down_block_types", ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"])
    unet.setdefault("up_block_types", ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1))
    unet.setdefault("layers_per_block", 1)
    unet.setdefault("norm_num_groups", 8)
    for k in ("down_block_types", "up_block_types"):
        if len(unet[k]) != n:
            raise ConfigError(
                f"`model.unet.{k}` has {len(unet[k])} entries but `model.unet.block_out_channels` "
                f"= {widths} has {n}; give one block type per width."
            )
    groups = int(unet["norm_num_groups"])
    if any(wd % groups for wd in widths):
        raise ConfigError(
            f"`model.unet.block_out_channels` = {widths} must all be divisible by "
            f"`model.unet.norm_num_groups` = {groups}; change one of them."
        )
    factor = 2 ** (n - 1)
    if h % factor or w % factor:
        raise ConfigError(
            f"image size {h}x{w} (`data.image_size`) must be divisible by {factor} for a UNet with "
            f"{n} levels (`model.unet.block_out_channels` = {widths}); change either."
        )
    return _plain(
        {
            **unet,
            "sample_size": h if h == w else [h, w],
            "in_channels": c,
            "out_channels": c,
            "num_class_embeds": (num_classes + 1) * int(augment_classes),
        }
    )


def build_unet(config: Mapping[str, Any]) -> UNet2DModel:
    try:
        return UNet2DModel.from_config(dict(config))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`model.unet` does not make a valid diffusers UNet2DModel: {e}") from e
