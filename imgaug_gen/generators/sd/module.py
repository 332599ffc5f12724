"""The ``sd_lora`` kind's training module: LoRA fine-tuning (and/or textual inversion, per-class adapters) of a
pretrained Stable Diffusion 1.x/2.x or SDXL, one prompt per class.

Training recipe (as diffusers' ``train_text_to_image_lora.py`` / ``train_dreambooth_lora.py`` and, for SDXL,
``train_dreambooth_lora_sdxl.py``): the VAE and text encoder(s) frozen; peft LoRA adapters on the UNet's
attention projections (and optionally on the text encoder(s)), and/or one learned token per class
(DA-Fusion), or one named adapter per class (DataDream); AdamW, epsilon- or v-prediction MSE
(optionally Min-SNR weighted), optional noise offset, gradient checkpointing, mixed precision with the
frozen weights in ``weight_dtype`` and the trained ones in float32. Only the trained weights (and their
optimiser state) go into the Lightning checkpoints; the frozen base model is reloaded from
``model.pretrained`` on resume.

The constructor's arguments come in typed blocks (``model.lora.*``, ``model.textual_inversion.*``,
``model.prompts.*``, ``model.optim.*``, ``model.sampling.*``, ``model.sdxl.*``): their types, ranges and
choices are the checks, read by the config schema before anything is built.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Annotated, Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from imgaug_gen.errors import ConfigError
from imgaug_gen.generators.finetune import make_lora_config
from imgaug_gen.generators.module import GeneratorModule
from imgaug_gen.generators.schedulers import convert_scheduler
from imgaug_gen.generators.sd import textual_inversion as ti
from imgaug_gen.generators.sd.checks import check_checkpoint_state, check_image_size, check_options, warn_long_prompts
from imgaug_gen.generators.sd.family import detect_family, load_components, resolve_pretrained, resolve_vae
from imgaug_gen.generators.sd.generator import DTYPES, SDLoRAGenerator
from imgaug_gen.generators.sd.lora import (
    LORA_WEIGHTS_NAME,
    activate_adapter,
    class_adapter_file,
    class_adapter_name,
    quiet_diffusers,
)
from imgaug_gen.generators.sd.options import (
    LoRAOptions,
    OptimOptions,
    PromptOptions,
    SamplingOptions,
    SDXLOptions,
    TextualInversionOptions,
)
from imgaug_gen.generators.sd.prompts import build_prompts

log = logging.getLogger(__name__)

_MIXED = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def block(cls: type[BaseModel], value: Any, key: str) -> BaseModel:
    """A typed block from its config (a mapping, or already the block), errors naming `model.<key>.<field>`."""
    from imgaug_gen.schemas import validate

    if isinstance(value, cls):
        return value
    return validate(dict(value or {}), cls, "sd_lora model", prefix=f"model.{key}", source="conf/model/sd_lora.yaml")


class SDLoRAModule(GeneratorModule):
    """LoRA fine-tuning (and/or textual inversion) of a pretrained Stable Diffusion 1.x/2.x or SDXL,
    one prompt per class.

    Only the LoRA weights and the learned token vectors are trainable, optimised and checkpointed.
    ``weight_dtype`` (``auto``: float16 / bfloat16 under ``trainer.precision=16-mixed`` /
    ``bf16-mixed``, else float32) is the dtype of the frozen weights; trained weights stay float32.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        pretrained: Optional[str] = None,
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        cache_dir: Optional[str] = None,
        family: Literal["auto", "sd", "sdxl"] = "auto",
        vae: Optional[str] = None,
        lora: LoRAOptions = LoRAOptions(),
        textual_inversion: TextualInversionOptions = TextualInversionOptions(),
        prompts: PromptOptions = PromptOptions(),
        optim: OptimOptions = OptimOptions(),
        sampling: SamplingOptions = SamplingOptions(),
        sdxl: SDXLOptions = SDXLOptions(),
        gradient_checkpointing: bool = False,
        snr_gamma: Optional[Annotated[float, Field(gt=0)]] = None,
        noise_offset: Annotated[float, Field(ge=0)] = 0.0,
        prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None,
        weight_dtype: Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] = "auto",
        seed: int = 0,
    ):
        super().__init__()
        # 1. The typed blocks (checked again here for Python callers), rules across them, the prompts.
        self.lora = block(LoRAOptions, lora, "lora")
        self.ti_options = block(TextualInversionOptions, textual_inversion, "textual_inversion")
        self.prompt_options = block(PromptOptions, prompts, "prompts")
        self.optim = block(OptimOptions, optim, "optim")
        self.sampling = block(SamplingOptions, sampling, "sampling")
        self.sdxl = block(SDXLOptions, sdxl, "sdxl")
        args = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "__class__", "lora", "textual_inversion", "prompts", "optim", "sampling", "sdxl")
        }
        self.save_hyperparameters(
            {
                **args,
                "lora": self.lora.model_dump(),
                "textual_inversion": self.ti_options.model_dump(),
                "prompts": self.prompt_options.model_dump(),
                "optim": self.optim.model_dump(),
                "sampling": self.sampling.model_dump(),
                "sdxl": self.sdxl.model_dump(),
            }
        )
        self.noise_seed = int(seed)
        h, w = self._check_options()
        self.pretrained = resolve_pretrained(pretrained, revision, cache_dir=cache_dir)
        self.vae_path = resolve_vae(vae, cache_dir=cache_dir)
        self.family, index = detect_family(self.pretrained, revision, cache_dir, expect=family)
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))

        # 2. Load the base model (the real from_pretrained code) and check it against the data.
        comps = load_components(self.family, self.pretrained, revision, variant, self.vae_path, cache_dir=cache_dir)
        self._set_components(comps)
        check_image_size(self.vae, self.unet, h, w)

        # 3. Learned class tokens, frozen base model, trainable LoRA adapters.
        self.ti = torch.nn.ModuleList(self._add_placeholders() if self.ti_options.enabled else [])
        warn_long_prompts(self.tokenizers, self.hparams.class_names, self.prompts)
        self._add_adapters(gradient_checkpointing, self.lora.text_encoder)
        # a batch trains only the adapters of its classes; SDXL reads text encoder 1's penultimate layer,
        # so LoRA on its last layer gets no gradient
        if self.lora.per_class or (self.lora.text_encoder and self.family.name == "sdxl"):
            self.ddp_find_unused_parameters = True
        self.weight_dtype = torch.float32
        # Only the trained weights are checkpointed; on_load_checkpoint checks that they are all there.
        self.strict_loading = False
        self._class_embeds: tuple | None = None

    # -- construction steps ----------------------------------------------------------------------
    def _check_options(self) -> tuple[int, int]:
        """Rules across blocks, prompts and LoRA configs; returns the image (height, width)."""
        hp, lora = self.hparams, self.lora
        h, w = check_options(hp.image_shape, lora, self.ti_options)
        self.placeholders = ti.placeholder_tokens(hp.class_names) if self.ti_options.enabled else None
        po = self.prompt_options
        self.prompts = build_prompts(
            hp.class_names,
            po.template,
            po.class_prompts,
            po.identifier_tokens,
            po.humanize_class_names,
            self.placeholders,
        )
        self.unet_lora_config = (
            make_lora_config(lora.rank, lora.alpha, lora.dropout, lora.target_modules) if lora.enabled else None
        )
        self.text_lora_config = (
            make_lora_config(lora.rank, lora.alpha, lora.dropout, lora.text_encoder_target_modules)
            if lora.enabled and lora.text_encoder
            else None
        )
        return h, w

    def _set_components(self, comps: dict[str, Any]) -> None:
        hp = self.hparams
        self.noise_scheduler = comps["noise_scheduler"]
        self.sample_scheduler = convert_scheduler(
            comps["scheduler"], self.sampling.scheduler, "model.sampling.scheduler"
        )
        if hp.prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=hp.prediction_type)
        self.vae, self.unet = comps["vae"], comps["unet"]
        self.tokenizer, self.tokenizer_2 = comps["tokenizer"], comps.get("tokenizer_2")
        self.text_encoder, self.text_encoder_2 = comps["text_encoder"], comps.get("text_encoder_2")

    @property
    def text_encoders(self) -> list:
        return [getattr(self, s) for s in self.family.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, s) for s in self.family.tokenizers]

    def _add_placeholders(self) -> list[ti.TokenVectors]:
        """One placeholder token per class in every tokenizer / text encoder (textual inversion)."""
        hp = self.hparams
        init = self.ti_options.init
        texts = [init if init else str(c).replace("_", " ") for c in hp.class_names]
        return [
            ti.add_placeholder_tokens(tok, enc, self.placeholders, texts)
            for tok, enc in zip(self.tokenizers, self.text_encoders)
        ]

    def _add_adapters(self, gradient_checkpointing: bool, train_text_encoder: bool) -> None:
        """Freeze the base model, add the LoRA adapter(s) (float32: one, or one per class), set train/eval modes."""
        from diffusers.training_utils import cast_training_params
        from peft import inject_adapter_in_model

        for module in (self.vae, self.unet, *self.text_encoders):
            module.requires_grad_(False)
        names = [class_adapter_name(c) for c in range(self.hparams.num_classes)] if self.lora.per_class else ["default"]
        with warnings.catch_warnings():  # peft warns at every named adapter after the first
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            for name in names if self.unet_lora_config is not None else []:
                self.unet.add_adapter(copy.deepcopy(self.unet_lora_config), adapter_name=name)
                # the text encoders through peft itself, as diffusers' training scripts do: transformers'
                # own `add_adapter` ties each transformers release to a minimum peft version
                for encoder in self.text_encoders if self.text_lora_config is not None else []:
                    inject_adapter_in_model(copy.deepcopy(self.text_lora_config), encoder, adapter_name=name)
        self._trainable = [n for n, p in self.named_parameters() if "lora_" in n or n.startswith("ti.")]
        self._restore_requires_grad()  # peft leaves only the last added adapter trainable
        cast_training_params([self.unet, *self.text_encoders], dtype=torch.float32)  # LoRA in fp32, always
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders if train_text_encoder else []:
                ckpt_kwargs = {"use_reentrant": False}  # the frozen embeddings' output needs no grad
                if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x
                    encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
                else:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        # Train mode only where there is something to train (from_pretrained leaves all in eval mode).
        self.unet.train()
        for encoder in self.text_encoders:
            encoder.train(bool(train_text_encoder))
        self.vae.eval()

    # -- helpers -----------------------------------------------------------------------------
    def _restore_requires_grad(self) -> None:
        """Every trained tensor requires grad (activating one class adapter switches the others off)."""
        params = dict(self.named_parameters())
        for name in self._trainable:
            params[name].requires_grad_(True)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trained tensors: LoRA weights and learned token vectors."""
        params = dict(self.named_parameters())
        return [params[n] for n in self._trainable]

    def lora_state_keys(self) -> list[str]:
        return list(self._trainable)

    @staticmethod
    def _tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _encode(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = [self._tokenize(tok, self.prompts).to(self.device)[labels] for tok in self.tokenizers]
        return self.family.encode(self.text_encoders, ids)

    def _encode_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embeddings or None) of each label's prompt; cached while nothing in
        the text path trains."""
        if self.lora.text_encoder or self.ti_options.enabled:
            return self._encode(labels)
        if self._class_embeds is None or self._class_embeds[0].device != self.device:
            with torch.no_grad():
                self._class_embeds = self._encode(torch.arange(len(self.prompts), device=self.device))
        hidden, pooled = self._class_embeds
        return hidden[labels], None if pooled is None else pooled[labels]

    def _unet_pred(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self._encode_labels(labels)
        _, h, w = self.hparams.image_shape
        added = self.family.added_cond(pooled, self._family_config(), int(h), int(w))
        return self.unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction; with per-class adapters one forward per class in the batch, each with
        that class's adapter active (so each adapter learns only from its class's images)."""
        if not self.lora.per_class:
            return self._unet_pred(noisy, timesteps, labels)
        parts, order = [], []
        try:
            for label in labels.unique().tolist():
                idx = (labels == label).nonzero().squeeze(1)
                activate_adapter([self.unet, *self.text_encoders], class_adapter_name(label))
                parts.append(self._unet_pred(noisy[idx], timesteps[idx], labels[idx]))
                order.append(idx)
        finally:
            self._restore_requires_grad()
        order = torch.cat(order)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[inverse]

    def _family_config(self) -> dict[str, Any]:
        cfg = {"family": self.family.name, "vae": self.vae_path}
        if self.family.name == "sdxl":
            cfg.update(
                {
                    "original_size": None if self.sdxl.original_size is None else list(self.sdxl.original_size),
                    "crops_coords_top_left": list(self.sdxl.crops_coords_top_left),
                    "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                }
            )
        return cfg

    def _generator_config(self) -> dict[str, Any]:
        hp = self.hparams

        def lora(cfg):
            return (
                None
                if cfg is None
                else {
                    "rank": cfg.r,
                    "alpha": cfg.lora_alpha,
                    "dropout": cfg.lora_dropout,
                    "target_modules": sorted(cfg.target_modules),
                }
            )

        per_class = [class_adapter_file(c) for c in range(hp.num_classes)] if self.lora.per_class else None
        shared = self.lora.enabled and not self.lora.per_class
        po, sa = self.prompt_options, self.sampling
        return {
            "num_classes": hp.num_classes,
            "class_names": list(hp.class_names),
            "image_shape": list(hp.image_shape),
            "pretrained": self.pretrained,
            "revision": hp.revision,
            "variant": hp.variant,
            "cache_dir": hp.cache_dir,
            **self._family_config(),
            "prompts": list(self.prompts),
            "prompt_template": po.template,
            "class_prompts": dict(po.class_prompts),
            "identifier_tokens": po.identifier_tokens,
            "negative_prompt": po.negative_prompt,
            "num_inference_steps": sa.num_inference_steps,
            "guidance_scale": sa.guidance_scale,
            "sample_scheduler": sa.scheduler,
            "micro_batch": sa.micro_batch,
            "inference_dtype": sa.inference_dtype,
            "lora": {"unet": lora(self.unet_lora_config), "text_encoder": lora(self.text_lora_config)}
            if self.lora.enabled
            else None,
            "lora_weights": LORA_WEIGHTS_NAME if shared else None,
            "class_adapters": per_class,
            "textual_inversion": ti.textual_inversion_config(self.placeholders, self.ti_options.init),
        }

    # -- what the rest of the framework needs ------------------------------------------------------
    def to_generator(self) -> SDLoRAGenerator:
        """The generator over this module's (shared, not copied) components."""
        comps = {
            slot: getattr(self, slot) for slot in ("unet", "vae", *self.family.text_encoders, *self.family.tokenizers)
        }
        return SDLoRAGenerator(
            self._generator_config(), scheduler=self.sample_scheduler, autocast_dtype=self.weight_dtype, **comps
        )

    # -- precision ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Frozen weights to ``weight_dtype`` (from ``trainer.precision`` when ``auto``), trained ones to
        float32. SDXL's own VAE stays float32 (it overflows in float16), as in diffusers' SDXL scripts."""
        from diffusers.training_utils import cast_training_params

        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision in ("16-true", "bf16-true", "16", "bf16"):
            raise ConfigError(
                f"`trainer.precision` = {precision!r} would train the LoRA weights in half precision; "
                "use `trainer.precision=bf16-mixed` (or 16-mixed): frozen weights in half, LoRA "
                "in float32, as diffusers' training scripts do."
            )
        name = self.hparams.weight_dtype
        self.weight_dtype = _MIXED.get(precision, torch.float32) if name == "auto" else DTYPES[name]
        vae_dtype = torch.float32 if self.family.name == "sdxl" and self.vae_path is None else self.weight_dtype
        self._restore_requires_grad()
        if self.weight_dtype != self.unet.conv_in.weight.dtype or vae_dtype != self.vae.dtype:
            with quiet_diffusers():  # "modules that should be kept in float32: []"
                self.vae.to(dtype=vae_dtype)
                for module in (*self.text_encoders, self.unet):
                    module.to(dtype=self.weight_dtype)
        cast_training_params([self.unet, *self.text_encoders], dtype=torch.float32)
        self._class_embeds = None

    # -- training ------------------------------------------------------------------------------
    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        o = self.optim
        params = dict(self.named_parameters())
        groups = [
            {"params": [params[n] for n in self._trainable if n.startswith(prefix)], "lr": lr, **extra}
            for prefix, lr, extra in (
                ("unet.", o.lr, {}),
                ("text_encoder", o.lr if o.lr_text_encoder is None else o.lr_text_encoder, {}),
                ("ti.", self.ti_options.lr, {"weight_decay": 0.0}),
            )
        ]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
        )
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        try:
            sched = get_scheduler(
                o.lr_scheduler,
                opt,
                num_warmup_steps=o.lr_warmup_steps,
                num_training_steps=max_steps if max_steps and max_steps > 0 else None,
            )
        except ValueError as e:
            raise ConfigError(f"`model.optim.lr_scheduler` = {o.lr_scheduler!r}: {e}") from e
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        gamma = self.hparams.snr_gamma
        if gamma is None:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        # Min-SNR weighting (Hang et al. 2023), as in diffusers' training scripts.
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=float(gamma))  # min(SNR, gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        else:
            weights = weights / snr
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (loss * weights).mean()

    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        g = self.training_noise()
        # 1. Encode the images to latents with the frozen VAE.
        with torch.no_grad():
            # the VAE's weight dtype (= vae.dtype; ModelMixin.dtype walks every submodule, ~0.3 ms a step)
            dist = self.vae.encode(pixels.to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
            latents = (dist.sample(generator=g) * self.vae.config.scaling_factor).to(self.weight_dtype)
        # 2. Noise (with the optional offset) at random timesteps.
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=g, device=latents.device, dtype=latents.dtype
            )
        sched = self.noise_scheduler
        timesteps = torch.randint(
            0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g, device=latents.device
        ).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        # 3. The regression target.
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(
                f"the scheduler of `model.pretrained` predicts {sched.config.prediction_type!r}; "
                "set `model.prediction_type` to epsilon or v_prediction."
            )
        # 4. Predict the noise (or v) conditioned on each image's class prompt (SDXL: + pooled text and
        #    time ids), and regress it.
        pred = self._predict(noisy, timesteps, labels)
        loss = self._loss(pred, target, timesteps)
        self.log_interval_mean("train/loss", loss)
        return loss

    # -- checkpoints: trained weights only ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = set(self.lora_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        super().on_save_checkpoint(checkpoint)
        checkpoint["sd_lora"] = {"pretrained": self.pretrained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_state(checkpoint.get("state_dict", {}), self.lora_state_keys(), dict(self.named_parameters()))
        super().on_load_checkpoint(checkpoint)
        info = checkpoint.get("sd_lora", {})
        if info.get("pretrained") not in (None, self.pretrained):
            log.warning("Resuming LoRA weights trained on %s on top of %s.", info["pretrained"], self.pretrained)
