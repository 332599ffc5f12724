"""Class-conditional GAN: the saved generator and its LightningModule.

Training recipe: hinge loss, a projection discriminator with spectral norm,
DiffAugment on real and fake images before the discriminator (on by default:
the data-efficient GAN result for small data sets), Adam with beta1 = 0, and an
EMA copy of the generator that is used for every sample, grid and saved model.
Manual optimisation: one discriminator step and one generator step per batch,
so Lightning's ``global_step`` (and ``trainer.max_steps``) counts 2 per batch.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.base import ConditionalGenerator, StrictGeneratorConfig, register_generator, to_uint8_nhwc
from imgaug_gen.generators.finetune import AdapterOptions, FinetuneMode, apply_finetune, merged_copy, trainable
from imgaug_gen.generators.module import GeneratorModule
from imgaug_gen.generators.priors import GANPrior, InitMode, check_prior_shape, grow_rows, load_gan_prior
from imgaug_gen.nets.cgan import CGANGenerator as _GeneratorNet
from imgaug_gen.nets.cgan import ProjectionDiscriminator
from imgaug_gen.nets.diffaug import POLICIES, AdaptiveAugmentProbability, diff_augment
from imgaug_gen.nets.ema import ema_decay, ema_update


def _noise(seeds: Sequence[int], z_dim: int, device) -> torch.Tensor:
    """One noise vector per image, each from its own seed (batch-independent): one generator
    re-seeded per image draws the same numbers as a fresh one per seed, without building it."""
    g, z = torch.Generator(), torch.empty(len(seeds), z_dim)
    for row, s in zip(z, seeds):
        torch.randn(z_dim, generator=g.manual_seed(int(s)), out=row)
    return z.to(device)


class GANConfig(StrictGeneratorConfig):
    """A cGAN generator's config.json."""

    z_dim: Annotated[int, Field(ge=1, le=4096)]
    width: Annotated[int, Field(ge=1, le=2048)]
    prior: Optional[dict] = None

    @model_validator(mode="after")
    def _square(self):
        _, h, w = self.image_shape
        if h != w or h < 8 or h & (h - 1) or h > 2048:
            raise ValueError(
                f"`image_shape` = {list(self.image_shape)}: the cGAN makes square power-of-two images "
                "of 8 to 2048 pixels"
            )
        return self


@register_generator("cgan")
class GANGenerator(ConditionalGenerator):
    """The EMA generator network of a cGAN run, behind the generator contract."""

    config_schema = GANConfig
    concurrent_sampling = True  # noise from a generator made per call, the network read only

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c, h, _ = self.image_shape
        self.net = _GeneratorNet(
            self.num_classes, image_size=h, channels=c, z_dim=config["z_dim"], width=config["width"]
        )

    def check_runs(self) -> None:
        self.net(torch.zeros(1, self.config["z_dim"]), torch.zeros(1, dtype=torch.long))

    def _sample_batch(self, labels: torch.Tensor, seeds: list[int], **kwargs) -> np.ndarray:
        z = _noise(seeds, self.config["z_dim"], self.device)
        return to_uint8_nhwc(self.net(z, labels))

    @classmethod
    def from_net(
        cls,
        net: _GeneratorNet,
        *,
        num_classes: int,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        extra: dict | None = None,
    ) -> "GANGenerator":
        config = {
            "num_classes": num_classes,
            "class_names": list(class_names),
            "image_shape": list(image_shape),
            "z_dim": net.z_dim,
            "width": net.width,
            **(extra or {}),
        }
        gen = cls(config)
        gen.net = net  # share weights: no copy
        return gen


DiffAugOp = Literal["color", "translation", "cutout"]


def _from_prior(key: str, given: int, default: int, theirs: int, pretrained: str) -> int:
    """A size set to something other than its default must be the prior's; else the prior's is used."""
    if given != default and given != theirs:
        raise ConfigError(
            f"`{key}` = {given}, but the prior `model.pretrained` = {pretrained!r} has {theirs}. The "
            "networks come from the prior: remove the override."
        )
    return int(theirs)


def prior_discriminator_width(prior) -> int | None:
    state = prior.discriminator_state
    return None if state is None else int(state["blocks.0.conv1.weight_orig"].shape[0])


def class_rows(net) -> list:
    """The class-conditional parameters of a cGAN network: the conditional norms' gains and biases (G),
    the projection embedding (D)."""
    return [
        p
        for name, p in net.named_parameters()
        if name.endswith(("gain.weight", "bias.weight")) or name.startswith("embed.")
    ]


def load_grown(net, state: dict, num_classes: int, init: str) -> None:
    """``state`` (a prior's weights, other classes) into ``net`` (this run's classes): every weight copied,
    each per-class table grown to the new classes (:func:`~imgaug_gen.generators.priors.grow_rows`: mean of
    the prior's rows, or the no-class value); a spectral norm's power-iteration vector over the classes
    starts afresh."""
    mine = net.state_dict()
    # the unconditional head (``model.unlabeled_weight``) is the run's own: a prior's is dropped, a new one fresh
    state = {k: v for k, v in state.items() if not k.startswith("uncond.") or k in mine}
    grown = {k: v for k, v in mine.items() if k.startswith("uncond.")}
    for k, v in state.items():
        if k not in mine:
            raise ConfigError(
                f"the prior's weight {k!r} has no place in this network; is it a cGAN run of this project?"
            )
        if k.endswith(("gain.weight", "bias.weight", "embed.weight_orig")):
            null = 1.0 if k.endswith("gain.weight") else 0.0
            grown[k] = grow_rows(v, num_classes, init, null)
        elif k.endswith("embed.weight_u"):
            grown[k] = mine[k]
        elif tuple(v.shape) != tuple(mine[k].shape):
            raise ConfigError(f"the prior's weight {k!r} is {tuple(v.shape)}, this network's {tuple(mine[k].shape)}.")
        else:
            grown[k] = v
    net.load_state_dict(grown)


def _start_from_prior(
    pretrained: Optional[str],
    with_discriminator: bool,
    image_shape: Sequence[int],
    z_dim: int,
    g_width: int,
    d_width: int,
    finetune: str,
    freeze_d: int,
) -> tuple[GANPrior | None, int, int, int]:
    """Start from a cGAN run: the prior and its sizes (z_dim, g_width, d_width); no prior: None, the sizes given."""
    if pretrained is None:
        if finetune != "full" or freeze_d:
            raise ConfigError(
                f"`model.finetune` = {finetune!r} / `model.freeze_d` = {freeze_d} adapt a prior; set "
                "`model.pretrained=RUN` (a cGAN run), or leave them at full / 0."
            )
        return None, z_dim, g_width, d_width
    prior = load_gan_prior(pretrained, with_discriminator)
    check_prior_shape(prior.image_shape, image_shape, pretrained)
    d_prior = prior_discriminator_width(prior)
    z_dim = _from_prior("model.z_dim", z_dim, 64, prior.z_dim, pretrained)
    g_width = _from_prior("model.g_width", g_width, 32, prior.width, pretrained)
    d_width = _from_prior("model.d_width", d_width, 32, d_prior, pretrained) if d_prior else d_width
    return prior, z_dim, g_width, d_width


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def lecam_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021): keeps D's real / fake outputs near the moving
    averages of the other side, ``E[relu(D(x) - a_F)^2] + E[relu(a_R - D(G(z)))^2]``."""
    return F.relu(real_logits - ema_fake).pow(2).mean() + F.relu(ema_real - fake_logits).pow(2).mean()


def semi_d_losses(discriminator, x: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor):
    """The discriminator's hinge losses on ``x`` = real then fake images (``labels`` for the fakes, the real
    images' own or any where ``labelled`` is false): the conditional loss reads the labelled real images and
    every fake, the unconditional head's every image. Returns (conditional loss, unconditional loss, the
    labelled real images' conditional logits, the fakes')."""
    logits, unc = discriminator.both(x, torch.cat([labels, labels]))
    real_logits, fake_logits = logits.chunk(2)
    real_logits = real_logits[labelled]  # a batch may hold no labelled image: sum / count, not mean
    real_term = F.relu(1.0 - real_logits).sum() / max(real_logits.numel(), 1)
    return real_term + F.relu(1.0 + fake_logits).mean(), hinge_d_loss(*unc.chunk(2)), real_logits, fake_logits


class CGANModule(GeneratorModule):
    """Training logic only; networks are plain modules from :mod:`imgaug_gen.nets`."""

    #: The discriminator step leaves the generator unused (and the EMA copy is never trained):
    #: under ``trainer=ddp`` the train job then asks DDP to look for unused parameters.
    ddp_find_unused_parameters = True  # the D step leaves G without gradients

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        z_dim: Annotated[int, Field(ge=1, le=4096)] = 64,
        g_width: Annotated[int, Field(ge=1, le=2048)] = 32,
        d_width: Annotated[int, Field(ge=1, le=2048)] = 32,
        lr_g: Annotated[float, Field(gt=0)] = 2e-4,
        lr_d: Annotated[float, Field(gt=0)] = 2e-4,
        betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.0, 0.999),
        diffaug: Optional[list[DiffAugOp]] = list(POLICIES),
        ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999,
        ema_start_step: Annotated[int, Field(ge=0)] = 0,
        lecam_lambda: Annotated[float, Field(ge=0)] = 0.0,
        lecam_ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.99,
        ada_target: Optional[Annotated[float, Field(gt=0, lt=1)]] = None,
        ada_interval: Annotated[int, Field(ge=1)] = 4,
        ada_kimg: Annotated[float, Field(gt=0)] = 20.0,
        channels_last: bool = True,
        pretrained: Optional[str] = None,
        pretrained_discriminator: bool = True,
        finetune: FinetuneMode = "full",
        init_class_embeddings: InitMode = "class_mean",
        freeze_d: Annotated[int, Field(ge=0, le=16)] = 0,
        lora: Optional[AdapterOptions] = None,
        unlabeled_weight: Annotated[float, Field(ge=0)] = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if isinstance(lora, AdapterOptions):  # plain data in hparams and checkpoints
            self.hparams["lora"] = lora.model_dump()
        self.automatic_optimization = False
        c, h, w = image_shape
        if h != w:
            raise ConfigError(f"`data.image_size` gives {h}x{w} images; the cGAN needs square images.")
        if ada_target is not None and not diffaug:
            raise ConfigError(
                f"`model.ada_target` = {ada_target!r} needs at least one `model.diffaug` op to apply "
                "adaptively; set `model.diffaug=[color,translation,cutout]` or `model.ada_target=null`."
            )
        # LeCam's moving averages of D(real) and D(fake): buffers, so checkpoints carry them.
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))
        self.ada = (
            AdaptiveAugmentProbability(ada_target, int(ada_interval), int(float(ada_kimg) * 1000))
            if ada_target is not None
            else None
        )
        prior, z_dim, g_width, d_width = _start_from_prior(
            pretrained, pretrained_discriminator, image_shape, z_dim, g_width, d_width, finetune, freeze_d
        )
        self.generator = _GeneratorNet(num_classes, image_size=h, channels=c, z_dim=z_dim, width=g_width)
        self.discriminator = ProjectionDiscriminator(
            num_classes, image_size=h, channels=c, width=d_width, unconditional_head=unlabeled_weight > 0
        )
        if freeze_d > len(self.discriminator.blocks):
            raise ConfigError(
                f"`model.freeze_d` = {freeze_d}; this discriminator has {len(self.discriminator.blocks)} "
                "blocks (give at most that many)."
            )
        self.prior = None
        if prior is not None:
            load_grown(self.generator, prior.generator.state_dict(), num_classes, init_class_embeddings)
            if prior.discriminator_state is not None:
                load_grown(self.discriminator, prior.discriminator_state, num_classes, init_class_embeddings)
            self.prior = {**prior.record(), "finetune": finetune, "freeze_d": int(freeze_d)}
        apply_finetune(self.generator, finetune, class_rows(self.generator), lora)
        for block in list(self.discriminator.blocks)[:freeze_d]:  # Freeze-D (Mo et al. 2020): D's first blocks
            block.requires_grad_(False)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.iteration = 0  # GAN iterations (one D + one G step)
        self.noise_seed = int(torch.initial_seed())  # the run's seed (seed_everything ran before the build)

    def setup(self, stage: str) -> None:
        # channels-last weights and activations while training: oneDNN's convolutions run faster in
        # NHWC on CPU (and cuDNN's under mixed precision). Done before Lightning restores a checkpoint
        # and builds the optimisers, so restored weights and optimiser states keep one layout; saved
        # generators are written contiguous (safetensors), so the layout never leaves the run.
        if self.hparams.channels_last:
            for net in (self.generator, self.discriminator, self.ema):
                net.to(memory_format=torch.channels_last)

    @classmethod
    def accepts_unlabeled(cls, args: Mapping[str, Any]) -> bool:
        """Unlabelled images train the discriminator's unconditional head: with ``unlabeled_weight`` > 0."""
        return float(args.get("unlabeled_weight") or 0) > 0

    # -- what the rest of the framework needs ---------------------------------------
    def to_generator(self) -> GANGenerator:
        hp = self.hparams
        return GANGenerator.from_net(
            merged_copy(self.ema),
            num_classes=hp.num_classes,
            class_names=hp.class_names,
            image_shape=hp.image_shape,
            extra=None if self.prior is None else {"prior": self.prior},
        )

    # -- training -------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        # foreach: one multi-tensor update instead of a Python loop over the parameters
        # only what trains: Lightning's toggle_optimizer would switch a frozen weight in an optimizer back on
        opt_g = torch.optim.Adam(trainable(self.generator), lr=hp.lr_g, betas=tuple(hp.betas), foreach=True)
        opt_d = torch.optim.Adam(trainable(self.discriminator), lr=hp.lr_d, betas=tuple(hp.betas), foreach=True)
        return [opt_d, opt_g]

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.hparams.diffaug:
            return x
        return diff_augment(x, self.hparams.diffaug, generator=generator, p=1.0 if self.ada is None else self.ada.p)

    def training_step(self, batch, batch_idx):
        real, labels = batch
        if self.hparams.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        opt_d, opt_g = self.optimizers()
        g = self.training_noise()  # noise and augmentations of this batch: (seed, batch, rank) only
        z = torch.randn(real.shape[0], self.hparams.z_dim, device=self.device, generator=g)
        uw = float(self.hparams.unlabeled_weight)
        labelled = labels >= 0  # unlabelled images (label -1, `data.unlabeled`) only reach the unconditional head
        if uw > 0:  # the fakes in their places take random classes
            drawn = torch.randint(0, self.hparams.num_classes, labels.shape, device=self.device, generator=g)
            labels = torch.where(labelled, labels, drawn)
        # One generator forward serves both steps (its graph is kept for the G step), and the
        # discriminator sees real and fake in one batch (it has no batch statistics, so this is
        # the same function as two calls, at about half the per-call overhead on CPU).
        fake = self.generator(z, labels)

        # 1. Discriminator step: real vs fake of the same labels.
        self.toggle_optimizer(opt_d)
        d_in = self._augment(torch.cat([real, fake.detach()]), g)
        if uw > 0:
            cond_loss, unc_loss, real_logits, fake_logits = semi_d_losses(self.discriminator, d_in, labels, labelled)
            d_loss = cond_loss + uw * unc_loss
        else:
            real_logits, fake_logits = self.discriminator(d_in, torch.cat([labels, labels])).chunk(2)
            d_loss = hinge_d_loss(real_logits, fake_logits)
        if self.hparams.lecam_lambda > 0 and real_logits.numel():
            d_loss = d_loss + self.hparams.lecam_lambda * lecam_loss(
                real_logits, fake_logits, self.lecam_ema_real, self.lecam_ema_fake
            )
            decay = self.hparams.lecam_ema_decay
            self.lecam_ema_real.mul_(decay).add_((1 - decay) * real_logits.detach().mean())
            self.lecam_ema_fake.mul_(decay).add_((1 - decay) * fake_logits.detach().mean())
        if self.ada is not None and real_logits.numel():
            self.ada.update(real_logits)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # 2. Generator step (the updated discriminator on the same fakes).
        self.toggle_optimizer(opt_g)
        if uw > 0:
            logits, unc = self.discriminator.both(self._augment(fake, g), labels)
            g_loss = hinge_g_loss(logits) + uw * hinge_g_loss(unc)
        else:
            g_loss = hinge_g_loss(self.discriminator(self._augment(fake, g), labels))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        # 3. EMA of the generator (weights and batch-norm statistics).
        self.iteration += 1
        self._update_ema()
        logs = {"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach()}
        if self.ada is not None:
            logs["train/ada_p"] = self.ada.p
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False)

    def _update_ema(self) -> None:
        ema_update(
            self.ema, self.generator, ema_decay(self.iteration - self.hparams.ema_start_step, self.hparams.ema_decay)
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gan_iteration"] = self.iteration
        if self.ada is not None:
            checkpoint["ada"] = self.ada.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.iteration = int(checkpoint.get("gan_iteration", 0))
        if self.ada is not None and "ada" in checkpoint:
            self.ada.load_state_dict(checkpoint["ada"])
