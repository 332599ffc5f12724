"""Class-conditional diffusion (DDPM) trained from scratch: the saved generator and its LightningModule.

Training recipe: a diffusers ``UNet2DModel`` with a class embedding of
``num_classes + 1`` entries (the last one is the "null" class), the standard
noise-prediction MSE loss at uniformly drawn timesteps of ``train_scheduler``
(a diffusers ``DDPMScheduler``), labels replaced by the null class with
probability ``cond_drop_prob`` so that one network is both conditional and
unconditional (classifier-free guidance), AdamW with an optional linear LR
warmup, and an EMA copy of the UNet that is used for every sample, grid and
saved model. Automatic optimisation: ``trainer.max_steps`` counts iterations.

Sampling and img2img: :class:`~imgaug_gen.generators.ddpm_sampling.DDPMGenerator`
(in :mod:`imgaug_gen.generators.ddpm_sampling`), the generator this module saves.
"""

from __future__ import annotations

import copy
import inspect
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import BaseModel, ConfigDict, Field

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.ddpm_sampling import DDPMGenerator
from imgaug_gen.generators.finetune import AdapterOptions, FinetuneMode, apply_finetune, merged_copy
from imgaug_gen.generators.module import GeneratorModule
from imgaug_gen.generators.priors import (  # noqa: F401  (DEFAULT_*: the defaults a prior's values replace)
    DEFAULT_TRAIN_SCHEDULER,
    DEFAULT_UNET,
    DiffusionPrior,
    InitMode,
    check_prior_architecture,
    check_prior_shape,
    ddpm_prior_shape,
    ddpm_unet_from_prior,
    load_ddpm_prior,
    prior_schedulers,
)
from imgaug_gen.generators.schedulers import build_scheduler, check_same_schedule, check_x0_clipping, scheduler_spec
from imgaug_gen.generators.schedulers import plain as _plain
from imgaug_gen.nets.ema import ema_decay, ema_update
from imgaug_gen.nets.unet import AUGMENT_GROUPS, apply_group_element, augment_group_size, build_unet, unet_config  # noqa: F401  (part of the kind's API)


class AugmentOptions(BaseModel):
    """``model.augment``: non-leaking augmentation (EDM, Karras et al. 2022 section 5)."""

    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.0, ge=0, le=1)  # share of training images transformed (0 = off)
    ops: Literal["none", "flips", "dihedral"] = "flips"


# -- building the module: its steps ---------------------------------------------------------------
def _schedulers(train_scheduler: Any, sample_scheduler: Any) -> tuple[SchedulerMixin, SchedulerMixin]:
    """The training and sampling schedulers from their specs (default: DDPM, and DDIM on its schedule)."""
    train = build_scheduler(
        train_scheduler if train_scheduler is not None else {"class_name": "DDPMScheduler", "config": {}},
        "model.train_scheduler",
        allow_target=True,
    )
    sample = build_scheduler(
        sample_scheduler
        if sample_scheduler is not None
        else {"class_name": "DDIMScheduler", "config": _plain(train.config)},
        "model.sample_scheduler",
        allow_target=True,
    )
    return train, sample


def _start_from_prior(
    pretrained: Optional[str],
    finetune: str,
    image_shape: Sequence[int],
    unet: Mapping[str, Any] | None,
    train: SchedulerMixin,
    sample: SchedulerMixin,
) -> tuple[DiffusionPrior | None, SchedulerMixin, SchedulerMixin]:
    """0. Start from a prior: its schedule, architecture and weights (no prior: None, the schedulers as given)."""
    if pretrained is None:
        if finetune != "full":
            raise ConfigError(
                f"`model.finetune` = {finetune!r} adapts a prior; set `model.pretrained=PATH` (a ddpm run "
                "or a diffusers UNet2DModel / DDPMPipeline folder), or `model.finetune=full`."
            )
        return None, train, sample
    prior = load_ddpm_prior(pretrained)
    check_prior_shape(prior.image_shape, image_shape, pretrained)
    check_prior_architecture(unet, prior)
    train, sample = prior_schedulers(prior, train, sample)
    return prior, train, sample


def _check_guidance(cond_drop_prob: float, guidance_scale: float) -> None:
    """Guidance needs a trained null class, so label dropout."""
    if cond_drop_prob == 0 and guidance_scale != 1:
        raise ConfigError(
            f"`model.guidance_scale` = {guidance_scale} needs `model.cond_drop_prob` > 0 (the null "
            "class is never trained otherwise); set `model.guidance_scale=1` or "
            "`model.cond_drop_prob=0.1`."
        )


# -- training -----------------------------------------------------------------------------------
class DDPMModule(GeneratorModule):
    """Training logic only: epsilon (or v) prediction MSE, label dropout for CFG, EMA."""

    trains_unlabeled = True  # unlabelled images train the null class

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        unet: Mapping[str, Any] | None = None,
        train_scheduler: Any = None,
        sample_scheduler: Any = None,
        num_inference_steps: Annotated[int, Field(ge=1)] = 20,
        guidance_scale: Annotated[float, Field(ge=0)] = 1.5,
        eta: Annotated[float, Field(ge=0, le=1)] = 0.0,
        cond_drop_prob: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        lr: Annotated[float, Field(gt=0)] = 1e-3,
        betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999),
        weight_decay: Annotated[float, Field(ge=0)] = 0.0,
        lr_warmup_steps: Annotated[int, Field(ge=0)] = 0,
        ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999,
        noise_seed: int | None = None,
        augment: AugmentOptions = AugmentOptions(),
        pretrained: Optional[str] = None,
        finetune: FinetuneMode = "full",
        init_class_embeddings: InitMode = "null_class",
        lora: Optional[AdapterOptions] = None,
        embedding_lr: Optional[Annotated[float, Field(gt=0)]] = None,
    ):
        super().__init__()
        # The schedulers are stored as plain specs, so that hparams (and the checkpoint) hold no objects.
        train, sample = _schedulers(train_scheduler, sample_scheduler)
        prior, train, sample = _start_from_prior(pretrained, finetune, image_shape, unet, train, sample)
        check_same_schedule(train, sample)
        check_x0_clipping(train, sample)
        train_scheduler, sample_scheduler = scheduler_spec(train), scheduler_spec(sample)
        _check_guidance(cond_drop_prob, guidance_scale)
        augment = augment if isinstance(augment, AugmentOptions) else AugmentOptions.model_validate(dict(augment or {}))
        aug_p, aug_ops = augment.p, augment.ops
        self._aug_classes = augment_group_size(aug_ops, image_shape) if aug_p > 0 else 1
        self.save_hyperparameters(
            {
                k: v
                for k, v in locals().items()
                if k in inspect.signature(type(self).__init__).parameters and k != "self"
            }
            | {"augment": augment.model_dump(), "lora": lora.model_dump() if isinstance(lora, AdapterOptions) else lora}
        )
        if prior is None:
            self.unet = build_unet(unet_config(num_classes, image_shape, unet, self._aug_classes))
            self.prior = None
        else:
            self.unet = ddpm_unet_from_prior(prior, num_classes, self._aug_classes, init_class_embeddings)
            self.prior = {**prior.record(), "finetune": finetune}
        apply_finetune(self.unet, finetune, [self.unet.class_embedding.weight], lora)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise_scheduler = train
        self.sample_scheduler = sample
        # validate the sampling defaults now, not at the first sample grid
        defaults = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta}
        self.to_generator().sample_options(defaults, prefix="model")
        self.ema_updates = 0
        # Training noise, timesteps and label dropout: GeneratorModule.training_noise, a function of (seed, batch,
        # rank). Default seed: the run's (`seed`, set by seed_everything before the build).
        self.noise_seed = int(torch.initial_seed() if noise_seed is None else noise_seed)

    # -- what the rest of the framework needs ------------------------------------------
    def to_generator(self) -> DDPMGenerator:
        hp = self.hparams
        return DDPMGenerator.from_unet(
            merged_copy(self.ema),
            num_classes=hp.num_classes,
            class_names=hp.class_names,
            image_shape=hp.image_shape,
            train_scheduler=self.noise_scheduler,
            sample_scheduler=self.sample_scheduler,
            num_inference_steps=hp.num_inference_steps,
            guidance_scale=hp.guidance_scale,
            eta=hp.eta,
            extra=None if self.prior is None else {"prior": self.prior},
        )

    @classmethod
    def check_config(cls, args: Mapping[str, Any], image_shape: Sequence[int]) -> None:
        """Before any data is read: a prior's image size and channels against the data's."""
        if args.get("pretrained") is not None:
            check_prior_shape(ddpm_prior_shape(args["pretrained"]), image_shape, args["pretrained"])

    # -- training ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        emb = self.unet.class_embedding.weight
        rest = [p for p in self.unet.parameters() if p.requires_grad and p is not emb]
        groups = [{"params": [emb], "lr": hp.embedding_lr or hp.lr}] + ([{"params": rest}] if rest else [])
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.lr_warmup_steps <= 0:
            return opt
        warmup = int(hp.lr_warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        n, rng = x0.shape[0], self.training_noise()
        # 1. Unlabelled images (label -1, `data.unlabeled`) train the null class only; labelled ones drop to
        # it at `cond_drop_prob` (classifier-free guidance).
        null = self.hparams.num_classes
        labels = torch.where(labels < 0, torch.full_like(labels, null), labels)
        if self.hparams.cond_drop_prob > 0:
            drop = torch.rand(n, device=self.device, generator=rng) < self.hparams.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)
        # 1b. Non-leaking augmentation: transform some images and tell the UNet which transform
        # (its own class-embedding entry); sampling uses the identity, so transforms never leak.
        if self._aug_classes > 1:
            p = float(self.hparams.augment["p"])
            k = torch.randint(1, self._aug_classes, (n,), device=self.device, generator=rng)
            k = torch.where(torch.rand(n, device=self.device, generator=rng) < p, k, torch.zeros_like(k))
            x0 = x0.clone()
            for g in k.unique().tolist():
                if g:
                    idx = (k == g).nonzero().squeeze(1)
                    x0[idx] = apply_group_element(x0[idx], g)
            labels = labels + (self.hparams.num_classes + 1) * k
        # 2. Noise the images at random timesteps.
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=rng)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=self.device, generator=rng)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        # 3. Predict the noise (or v) and regress it.
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = self.unet(x_t, t, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        self.log_interval_mean("train/loss", loss)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()  # after every real optimiser step (also under gradient accumulation)

    def _update_ema(self) -> None:
        self.ema_updates += 1
        ema_update(self.ema, self.unet, ema_decay(self.ema_updates, self.hparams.ema_decay))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ema_updates"] = self.ema_updates

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ema_updates = int(checkpoint.get("ema_updates", 0))
