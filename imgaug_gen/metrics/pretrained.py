"""Pretrained feature spaces from local weights: the standard FID Inception, DINOv2 and CLIP.

Nothing is downloaded at run time: each extractor reads a file or folder the user gives in
``metrics.*_weights``, and a missing or wrong one is a :class:`ConfigError` that names the key,
the value, what was expected and where to get it. Loading never executes code from the file
(safetensors, or ``torch.load(weights_only=True)``).

* ``inception`` (:class:`InceptionFeatures`): the FID Inception-v3 ported from TensorFlow
  (``pt_inception-2015-12-05``), run by torchmetrics' ``NoTrainInceptionV3`` exactly as its
  ``FrechetInceptionDistance`` does (uint8 in, resized to 299 inside the network, 2048-d pool
  features). FIDs in this space are the ones papers, torch-fidelity, clean-fid and torchmetrics
  report.
* ``dinov2`` (:class:`DINOv2Features`): the CLS embedding of a DINOv2 ViT (transformers
  ``Dinov2Model``, ``pooler_output``) at 224 px, ImageNet-normalised: FD-DINOv2 (Stein et al.
  2023), which ranks generators closer to human judgement than Inception.
* ``clip`` (:class:`CLIPFeatures`): the projected image embedding of a CLIP vision tower
  (``CLIPVisionModelWithProjection.image_embeds``), CLIP-normalised: FD-CLIP (Kynkäänniemi
  et al. 2023).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imgaug_gen.errors import ConfigError, require
from imgaug_gen.metrics.features import FeatureExtractor, to_float01

__all__ = ["CLIPFeatures", "DINOv2Features", "InceptionFeatures", "load_state_dict_file"]

FID_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_INCEPTION_HELP = (
    "`metrics.features=inception` is the standard FID network, whose weights cannot be downloaded at run "
    "time: download `weights-inception-2015-12-05-6726825d.pth` once on a machine with internet "
    f"({FID_INCEPTION_URL}, the file torch-fidelity and torchmetrics use), copy it here and pass "
    "`metrics.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth` (a .safetensors conversion "
    "works too), or use the offline default `metrics.features=domain`"
)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_state_dict_file(path: Path, key: str, help_text: str) -> dict[str, torch.Tensor]:
    """A name -> tensor dict from ``.safetensors`` or a ``torch.save`` file, read without running
    code from it (``weights_only=True``); anything else is a :class:`ConfigError` naming ``key``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported as a user error
        raise ConfigError(
            f"`{key}` = {str(path)!r} could not be read as a state dict "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {help_text}."
        ) from e
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    require(
        isinstance(sd, Mapping) and all(isinstance(v, torch.Tensor) for v in sd.values()),
        f"`{key}` = {str(path)!r} does not hold a state dict (name -> tensor); {help_text}.",
    )
    return dict(sd)


def _given_path(value: Any, key: str, help_text: str) -> Path:
    require(
        value is not None and str(value).strip() not in ("", "None", "null"),
        f"`{key}` is {value!r} but this feature space needs it: {help_text}.",
    )
    return Path(str(value)).expanduser()


class InceptionFeatures(FeatureExtractor):
    """The standard FID Inception-v3 (2048-d pool features) from a local weights file.

    Inputs: uint8 ``[N, C, H, W]``; grayscale is replicated to RGB; the network resizes to 299x299
    itself (bilinear, antialiased: torchmetrics' default), so scores equal torchmetrics'
    ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=<same file>)``.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = _given_path(weights_path, "metrics.inception_weights", _INCEPTION_HELP)
        require(path.is_file(), f"`metrics.inception_weights` = {str(path)!r} is not a file; {_INCEPTION_HELP}.")
        sd = load_state_dict_file(path, "metrics.inception_weights", _INCEPTION_HELP)
        fc = sd.get("fc.weight")
        if fc is not None and tuple(fc.shape) == (1000, 2048):
            raise ConfigError(
                f"`metrics.inception_weights` = {str(path)!r} is torchvision's ImageNet Inception-v3 "
                f"(1000 classes), not the FID Inception (1008 classes) papers use; {_INCEPTION_HELP}."
            )
        require(
            fc is not None and tuple(fc.shape) == (1008, 2048) and "Mixed_7c.branch_pool.conv.weight" in sd,
            f"`metrics.inception_weights` = {str(path)!r} is not the FID Inception-v3 state dict (expected "
            f"`fc.weight` [1008, 2048] and `Mixed_7c.*`; first keys: {list(sd)[:4]}); {_INCEPTION_HELP}.",
        )
        with tempfile.TemporaryDirectory() as tmp:
            # torch-fidelity reads its file with torch.load(weights_only=False). It is handed a copy written
            # here from tensors already loaded safely, so unpickling it runs no code from the user's file.
            safe_copy = Path(tmp) / "fid_inception.pt"
            torch.save(sd, safe_copy)
            try:
                self.net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=[str(self.num_features)],
                    feature_extractor_weights_path=str(safe_copy),
                )
            except RuntimeError as e:
                raise ConfigError(
                    f"`metrics.inception_weights` = {str(path)!r} does not match the FID Inception "
                    f"({str(e).splitlines()[0]} ...); {_INCEPTION_HELP}."
                ) from e
        self.weights_path = str(path)
        self.name = "fid-inception-v3-2015-12-05-pool3"
        self._freeze()

    @property
    def device(self) -> torch.device:
        return self.net.Conv2d_1a_3x3.conv.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        to_float01(x[:0], 3, 8)  # the input contract (uint8, 1 or 3 channels) with its error messages
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x.contiguous()).float()


def _pretrained_folder(value: Any, key: str, model_types: tuple[str, ...], help_text: str) -> Path:
    path = _given_path(value, key, help_text)
    require(path.is_dir(), f"`{key}` = {str(path)!r} is not a folder; {help_text}.")
    cfg_file = path / "config.json"
    require(
        cfg_file.is_file(),
        f"`{key}` = {str(path)!r} has no config.json (not a transformers model folder); {help_text}.",
    )
    model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    require(
        model_type in model_types,
        f"`{key}` = {str(path)!r} holds a {model_type!r} model, expected one of {list(model_types)}; {help_text}.",
    )
    require(
        any(path.glob("*.safetensors")),
        f"`{key}` = {str(path)!r} has no .safetensors weights (pickled .bin "
        f"weights are not loaded: they can run code); {help_text}.",
    )
    return path


class _VisionBackbone(FeatureExtractor):
    """A transformers vision model from a local folder; uint8 images -> resized, normalised -> embedding."""

    def __init__(
        self,
        model: torch.nn.Module,
        path: Path,
        name: str,
        num_features: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int = 224,
    ) -> None:
        super().__init__()
        self.model, self.size = model, int(size)
        self.weights_path, self.name, self.num_features = str(path), name, int(num_features)
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> the model's input: RGB, bicubic to 224x224, normalised."""
        to_float01(x[:0], 3, 8)  # the input contract (uint8, 1 or 3 channels) with its error messages
        x = x.to(self._mean.device).float().div(255.0).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
        return (x - self._mean) / self._std


class DINOv2Features(_VisionBackbone):
    """FD-DINOv2 features: the CLS embedding (after the final layer norm) of a local DINOv2 model."""

    HELP = (
        "`metrics.features=dinov2` reads a DINOv2 model folder (config.json + model.safetensors): save one "
        "on a machine with internet, e.g. `huggingface-cli download facebook/dinov2-large --local-dir DIR` "
        "(ViT-L/14, as in Stein et al. 2023), and pass `metrics.dinov2_weights=DIR`"
    )

    def __init__(self, folder: str | os.PathLike | None) -> None:
        from transformers import Dinov2Model

        path = _pretrained_folder(folder, "metrics.dinov2_weights", ("dinov2",), self.HELP)
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        super().__init__(
            model, path, f"dinov2-{path.name}-cls", model.config.hidden_size, _IMAGENET_MEAN, _IMAGENET_STD
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(x)).pooler_output.float()


class CLIPFeatures(_VisionBackbone):
    """FD-CLIP features: the projected image embedding of a local CLIP vision tower."""

    HELP = (
        "`metrics.features=clip` reads a CLIP model folder (config.json + model.safetensors): save one on a "
        "machine with internet, e.g. `huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`, "
        "and pass `metrics.clip_weights=DIR`"
    )

    def __init__(self, folder: str | os.PathLike | None) -> None:
        from transformers import CLIPVisionModelWithProjection

        path = _pretrained_folder(folder, "metrics.clip_weights", ("clip", "clip_vision_model"), self.HELP)
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        super().__init__(
            model,
            path,
            f"clip-{path.name}-image-embeds",
            model.config.projection_dim,
            _CLIP_MEAN,
            _CLIP_STD,
            size=model.config.image_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(x)).image_embeds.float()
