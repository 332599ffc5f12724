"""Start a generator from a prior: a network that already knows the domain, adapted to new classes.

A prior is a local folder. Loading it is one function per source, each returning the prior's modules
and the facts the data must match (image size, channels, classes, noise schedule); the steps after
that are shared by every kind:

* :func:`grow_embedding` gives the user's classes their own rows of a class embedding, starting from
  the prior's null row or the mean of its class rows (``model.init_class_embeddings``), so that at
  step 0 the model samples what the prior samples;
* :func:`apply_finetune` chooses what trains (``model.finetune``): ``full`` (every weight),
  ``lora`` (peft LoRA adapters on chosen layers, the base frozen, as in SD-LoRA) or ``embeddings``
  (the class rows only, the analogue of textual inversion);
* :func:`merged_copy` folds LoRA adapters back into plain layers, so a saved generator is
  self-contained (it loads without the prior's folder, and without peft);
* :func:`prior_record` is what a generator's config.json and the manifest record of its prior
  (path and content hash).

Everything is read as data: safetensors only, offline, a project generator through
:func:`~imgaug_gen.generators.base.load_generator` (no ``_target_``), a diffusers folder with
``use_safetensors=True``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.schedulers import SCHEDULE_KEYS, build_scheduler, convert_scheduler, init_params
from imgaug_gen.generators.schedulers import plain as _plain

log = logging.getLogger(__name__)

InitMode = Literal["null_class", "class_mean"]


# -- what a prior is -------------------------------------------------------------------------------
def prior_record(path: str | Path, source: str, **facts: Any) -> dict[str, Any]:
    """What a generator records of the prior it started from (config.json ``prior``, manifest)."""
    from imgaug_gen.io import tree_hash

    path = Path(path).resolve()
    return {"path": str(path), "sha256": tree_hash(path), "source": source, **facts}


def resolve_prior(pretrained: Any, key: str = "model.pretrained") -> Path:
    """``model.pretrained`` as an existing local folder (nothing is downloaded)."""
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise ConfigError(
            f"`{key}` = {pretrained!r}; give a local folder (a run of this project, or a diffusers "
            "UNet2DModel / DDPMPipeline folder)."
        )
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"`{key}` = {pretrained!r} is not a folder. Point it at a local copy: nothing is "
            "downloaded at run time (e.g. `huggingface-cli download google/ddpm-cifar10-32 "
            "--local-dir priors/ddpm-cifar10-32` once, on a machine with internet)."
        )
    return path


# -- DDPM priors -----------------------------------------------------------------------------------
@dataclass
class DiffusionPrior:
    """A loaded diffusion prior: its UNet (weights on CPU), facts, and where its class rows are."""

    unet: Any  # diffusers UNet2DModel
    source: str  # "imgaug_gen" | "diffusers_unet" | "diffusers_pipeline"
    path: Path
    image_shape: tuple[int, int, int]  # (C, H, W) the prior was trained at
    train_scheduler: dict | None  # {"class_name", "config"}; None: the folder holds none
    num_classes: int | None  # the prior's classes (None: unconditional)
    class_names: list[str] | None
    has_null: bool  # the last row of each block is a null (unconditional) class
    aug_blocks: int = 1  # non-leaking augmentation blocks of its embedding
    extra: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return prior_record(self.path, self.source, num_classes=self.num_classes, class_names=self.class_names)


def _sample_hw(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


def load_ddpm_prior(pretrained: Any, key: str = "model.pretrained") -> DiffusionPrior:
    """A ddpm prior from a local folder: a run or generator folder of this project (kind ``ddpm``, any
    classes), a diffusers ``UNet2DModel`` folder, or a ``DDPMPipeline`` / ``DDIMPipeline`` folder."""
    from imgaug_gen.generators.base import CONFIG_NAME

    path = resolve_prior(pretrained, key)
    gen_dir = path / "generator" if (path / "generator" / CONFIG_NAME).is_file() else path
    config_file = gen_dir / CONFIG_NAME
    if config_file.is_file() and "kind" in _read_json(config_file, key):
        return _project_ddpm_prior(gen_dir, pretrained, key)
    unet_dir, scheduler = _pipeline_parts(path, pretrained, key)
    unet = _diffusers_unet(unet_dir, pretrained, key)
    h, w = _sample_hw(unet.config.sample_size)
    n = unet.config.num_class_embeds
    source = "diffusers_pipeline" if (path / "model_index.json").is_file() else "diffusers_unet"
    shape = (int(unet.config.in_channels), h, w)
    return DiffusionPrior(
        unet,
        source,
        path,
        shape,
        train_scheduler=scheduler,
        num_classes=None if n is None else int(n),
        class_names=None,
        has_null=False,
    )


def _project_ddpm_prior(gen_dir: Path, pretrained: Any, key: str) -> DiffusionPrior:
    """A ddpm generator folder of this project as a prior (any classes; its embedding has a null row)."""
    from imgaug_gen.generators.base import load_generator, read_run_config

    kind = read_run_config(gen_dir)["kind"]
    if kind != "ddpm":
        raise ConfigError(
            f"`{key}` = {str(pretrained)!r} holds a `{kind}` generator; a ddpm starts from a ddpm "
            "prior (a run of model=ddpm, or a diffusers UNet2DModel / DDPMPipeline folder)."
        )
    gen = load_generator(gen_dir)
    k = gen.num_classes
    blocks = int(gen.unet.config.num_class_embeds) // (k + 1)
    shape, scheduler = tuple(gen.image_shape), gen.config["train_scheduler"]
    return DiffusionPrior(
        gen.unet,
        "imgaug_gen",
        gen_dir,
        shape,
        train_scheduler=scheduler,
        num_classes=k,
        class_names=gen.class_names,
        has_null=True,
        aug_blocks=blocks,
    )


def _pipeline_parts(path: Path, pretrained: Any, key: str) -> tuple[Path, dict | None]:
    """A diffusers folder's UNet folder and training scheduler (a pipeline's ``unet/`` and ``scheduler/``)."""
    unet_dir, scheduler = path, None
    index = path / "model_index.json"
    if index.is_file():
        info = _read_json(index, key)
        if (path / "unet").is_dir():
            unet_dir = path / "unet"
        else:
            raise ConfigError(
                f"`{key}` = {str(pretrained)!r} is a {info.get('_class_name')} folder without a unet/ "
                "subfolder; give a DDPMPipeline / DDIMPipeline folder, or the UNet2DModel folder itself."
            )
        sched_file = path / "scheduler" / "scheduler_config.json"
        if sched_file.is_file():
            cfg = _read_json(sched_file, key)
            scheduler = {
                "class_name": "DDPMScheduler",
                "config": {k: v for k, v in cfg.items() if not str(k).startswith("_")},
            }
    return unet_dir, scheduler


def _diffusers_unet(unet_dir: Path, pretrained: Any, key: str) -> Any:
    """A diffusers ``UNet2DModel`` folder's UNet, read from safetensors only."""
    from diffusers import UNet2DModel

    unet_cfg = _read_json(unet_dir / "config.json", key) if (unet_dir / "config.json").is_file() else {}
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise ConfigError(
            f"`{key}` = {str(pretrained)!r} is neither a run of this project nor a diffusers UNet2DModel "
            f"/ DDPMPipeline folder (its config.json names {unet_cfg.get('_class_name')!r}). Give the "
            "folder train.py wrote, or one written by UNet2DModel / DDPMPipeline.save_pretrained."
        )
    if unet_cfg.get("class_embed_type") not in (None,):
        raise ConfigError(
            f"`{key}`: the UNet's class_embed_type = {unet_cfg.get('class_embed_type')!r}; only UNets "
            "with a class-embedding table (or none) can take new classes."
        )
    try:
        return UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(
            f"`{key}` = {str(pretrained)!r}: the UNet could not be loaded from safetensors ({e}). Weights "
            "are read from diffusion_pytorch_model.safetensors only (never a pickled .bin)."
        ) from None


def _read_json(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"`{key}`: {path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"`{key}`: {path} holds no JSON object.")
    return data


def check_prior_shape(
    prior_shape: Sequence[int], data_shape: Sequence[int], pretrained: str, key: str = "model.pretrained"
) -> None:
    """The data must have the prior's image size and channels (named with both values and the fix)."""
    (pc, ph, pw), (dc, dh, dw) = (int(v) for v in prior_shape), (int(v) for v in data_shape)
    if pc != dc:
        raise ConfigError(
            f"`data.channels` = {dc}, but the prior `{key}` = {pretrained!r} makes {pc}-channel images. "
            f"Set `data.channels={pc}` (images are converted on loading), or use another prior."
        )
    if (ph, pw) != (dh, dw):
        raise ConfigError(
            f"`data.image_size` = {dh} (images {dh}x{dw}), but the prior `{key}` = {pretrained!r} was "
            f"trained at {ph}x{pw}. Set `data.image_size={ph}` (your images are resized on loading), "
            "or use a prior trained at your size."
        )


def grow_embedding(
    old: torch.Tensor | None,
    *,
    old_classes: int | None,
    old_has_null: bool,
    old_blocks: int,
    new_classes: int,
    new_blocks: int,
    dim: int,
    init: InitMode = "null_class",
) -> torch.Tensor:
    """The class-embedding table of the new model: ``(new_classes + 1) * new_blocks`` rows (row
    ``y + (new_classes + 1) * k`` is class ``y`` under augmentation ``k``; the last row of a block is
    the null class). Every new class row starts from the prior's null row (``init="null_class"``: then the
    model conditioned on a new class samples exactly what the prior samples unconditionally) or the
    mean of the prior's class rows (``"class_mean"``); the null rows from the prior's null row. A prior
    without a null row uses the zero vector for it when unconditional (no table: the zero row adds
    nothing) and the mean of its rows when class-conditional; blocks the prior lacks start as its
    first block."""
    rows = torch.zeros((new_classes + 1) * new_blocks, dim)
    for k in range(new_blocks):
        if old is None:
            null = mean = torch.zeros(dim)
        else:
            kb = k if k < old_blocks else 0
            stride = (old_classes or 0) + (1 if old_has_null else 0)
            block = old[kb * stride : (kb + 1) * stride].float()
            classes = block[:old_classes] if old_has_null else block
            mean = classes.mean(0) if len(classes) else torch.zeros(dim)
            null = block[old_classes] if old_has_null else mean
        start = k * (new_classes + 1)
        rows[start : start + new_classes] = null if init == "null_class" else mean
        rows[start + new_classes] = null
    return rows


def ddpm_unet_from_prior(prior: DiffusionPrior, num_classes: int, aug_blocks: int, init: InitMode) -> Any:
    """The prior's UNet with a class embedding for the user's classes (and the null class), every other
    weight copied."""
    from diffusers import UNet2DModel

    from imgaug_gen.generators.schedulers import plain

    config = {k: v for k, v in plain(prior.unet.config).items()}
    config["num_class_embeds"] = (num_classes + 1) * aug_blocks
    config["class_embed_type"] = None
    unet = UNet2DModel.from_config(config)
    state = {k: v for k, v in prior.unet.state_dict().items() if not k.startswith("class_embedding.")}
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"class_embedding.weight"}:
        raise ConfigError(
            f"`model.pretrained` = {str(prior.path)!r}: its UNet's weights do not fit its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    old = prior.unet.class_embedding.weight.detach() if prior.unet.class_embedding is not None else None
    dim = unet.class_embedding.weight.shape[1]
    with torch.no_grad():
        unet.class_embedding.weight.copy_(
            grow_embedding(
                old,
                old_classes=prior.num_classes,
                old_has_null=prior.has_null,
                old_blocks=prior.aug_blocks,
                new_classes=num_classes,
                new_blocks=aug_blocks,
                dim=dim,
                init=init,
            )
        )
    return unet


#: conf/model/ddpm.yaml's `unet` and `train_scheduler` (a test keeps them equal): with `model.pretrained`,
#: a value left at its default gives way to the prior's; one set to something else must agree with it.
DEFAULT_UNET = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
DEFAULT_TRAIN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def _differs(given: Any, default: Any, prior: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(given) != norm(default) and norm(given) != norm(prior)


def check_prior_architecture(unet: Mapping[str, Any] | None, prior: DiffusionPrior) -> None:
    """With a prior the architecture is the prior's: a `model.unet` value other than the default must match it."""
    theirs = _plain(prior.unet.config)
    for key, value in dict(unet or {}).items():
        if _differs(value, DEFAULT_UNET.get(key), theirs.get(key)):
            raise ConfigError(
                f"`model.unet.{key}` = {value!r}, but the prior `model.pretrained` = {str(prior.path)!r} "
                f"has {key} = {theirs.get(key)!r}. The architecture comes from the prior: remove the "
                "override (or start from scratch without `model.pretrained`)."
            )


def prior_schedulers(prior: DiffusionPrior, train, sample):
    """The prior's noise schedule and prediction type for training and sampling; the configured sampler
    class and its options (spacing, thresholding, ...) are kept. A schedule setting set to something
    other than the default that disagrees with the prior is an error."""
    if prior.train_scheduler is None:
        log.warning(
            "the prior %s holds no scheduler: training with `model.train_scheduler` as configured; it must "
            "be the schedule the prior was trained with",
            prior.path,
        )
        return train, sample
    theirs = build_scheduler(prior.train_scheduler, f"the scheduler of {prior.path}")
    given, mine = _plain(train.config), _plain(theirs.config)
    for key in (*SCHEDULE_KEYS, "clip_sample"):
        if key in given and key in mine and _differs(given[key], DEFAULT_TRAIN_SCHEDULER.get(key), mine[key]):
            raise ConfigError(
                f"`model.train_scheduler.{key}` = {given[key]!r}, but the prior `model.pretrained` = "
                f"{str(prior.path)!r} was trained with {key} = {mine[key]!r}. The noise schedule comes "
                "with the prior: remove the override."
            )
    options = {
        k: v for k, v in _plain(sample.config).items() if k not in SCHEDULE_KEYS and k in init_params(type(sample))
    }
    return theirs, convert_scheduler(theirs, type(sample).__name__, **options)


def ddpm_prior_shape(pretrained: Any) -> tuple[int, int, int]:
    """(C, H, W) a ddpm prior makes, from its config files alone (no weights read)."""
    path = resolve_prior(pretrained)
    for cfg in (path / "generator" / "config.json", path / "config.json", path / "unet" / "config.json"):
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except ValueError:
                continue
            if isinstance(data.get("image_shape"), list):
                return tuple(int(v) for v in data["image_shape"])
            if data.get("_class_name") == "UNet2DModel":
                size = data.get("sample_size")
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                return int(data.get("in_channels", 3)), int(h), int(w)
    return load_ddpm_prior(pretrained).image_shape


# -- cGAN priors -----------------------------------------------------------------------------------
@dataclass
class GANPrior:
    generator: nn.Module  # the run's EMA generator network
    discriminator_state: dict | None  # from RUN/checkpoints/last.ckpt (None: not asked for)
    path: Path
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    z_dim: int
    width: int

    def record(self) -> dict[str, Any]:
        return prior_record(self.path, "imgaug_gen", num_classes=self.num_classes, class_names=self.class_names)


def load_gan_prior(pretrained: Any, with_discriminator: bool = True, key: str = "model.pretrained") -> GANPrior:
    """A cGAN run of this project: its EMA generator (``RUN/generator``) and, for the discriminator, the
    ``discriminator.*`` weights of ``RUN/checkpoints/last.ckpt`` (read with ``weights_only=True``)."""
    from imgaug_gen.generators.base import CONFIG_NAME, load_generator, read_run_config

    path = resolve_prior(pretrained, key)
    run = path.parent if path.name == "generator" else path
    gen_dir = run / "generator"
    if not (gen_dir / CONFIG_NAME).is_file():
        raise ConfigError(
            f"`{key}` = {str(pretrained)!r} holds no generator/ folder; a cGAN starts from a cGAN run "
            "(the folder train.py model=cgan wrote)."
        )
    kind = read_run_config(gen_dir)["kind"]
    if kind != "cgan":
        raise ConfigError(f"`{key}` = {str(pretrained)!r} holds a `{kind}` generator; a cGAN starts from a cGAN run.")
    gen = load_generator(gen_dir)
    d_state = None
    if with_discriminator:
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(
                f"`{key}` = {str(pretrained)!r} has no checkpoints/last.ckpt, which holds the "
                "discriminator. Point at the whole run folder, or set "
                "`model.pretrained_discriminator=false` to start the discriminator from scratch."
            )
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        d_state = {k[len("discriminator.") :]: v for k, v in state.items() if k.startswith("discriminator.")}
    return GANPrior(
        gen.net,
        d_state,
        run,
        tuple(gen.image_shape),
        gen.num_classes,
        gen.class_names,
        int(gen.config["z_dim"]),
        int(gen.config["width"]),
    )


def grow_rows(old: torch.Tensor, new_classes: int, init: InitMode, null_value: float) -> torch.Tensor:
    """A per-class table (``[classes, dim]``) for new classes: each row the mean of the prior's rows
    (``"class_mean"``), or the value that conditions on no class (``"null_class"``: gain 1, bias 0,
    projection 0)."""
    row = old.float().mean(0) if init == "class_mean" else torch.full((old.shape[1],), float(null_value))
    return row.expand(new_classes, -1).clone()
