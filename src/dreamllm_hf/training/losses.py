"""The DreamLLM training objective: next-token loss + `loss_weight_vm` x diffusion noise-prediction loss.

One forward of the language model gives both: the text (and `<dream_start>`) next-token loss, and the conditioning of
every dream block in the batch (`dream_embeddings`, the UNet's `encoder_hidden_states`). Each dream block's target
picture is VAE-encoded, noised at a random DDPM timestep, and the frozen UNet predicts the noise from that
conditioning; the mean squared error flows back through the frozen UNet into the condition projector, the dream
queries and the language model (and its adapters). This is the original's `DreamLLMForCausalMLM.forward` +
`StableDiffusionHead.forward` (`noise_offset`, `input_perturbation` and `snr_gamma` off, as in every released config).

Random draws, when not injected, come in the original's order from `generator` (or the global RNG): the VAE posterior
sample, then the noise, then the timesteps. With `torch.manual_seed(0)` right before the call, the result is the
original's to fp32 rounding (tests/fixtures/README.md section 5).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput

from ..decoder_conditioning import added_cond_kwargs, check_decoder, takes_pooled, vae_scale_factor


DEFAULT_LOSS_WEIGHT_LM = 1.0
DEFAULT_LOSS_WEIGHT_VM = 10.0  # the released config's `loss_weight_vm` (stages II and III)


@dataclass
class DiffusionLossOutput(ModelOutput):
    """
    The diffusion (score-distillation) loss of a set of pictures and every intermediate of its computation.

    Args:
        loss (`torch.FloatTensor` of shape `()`): mean squared error between the UNet prediction and its target
            (the noise for epsilon-prediction), averaged over every element, in fp32.
        latents (`torch.FloatTensor` of shape `(num_images, C, h, w)`): scaled VAE latents of the pictures.
        noise (`torch.FloatTensor`, same shape): the Gaussian noise added to them.
        timesteps (`torch.LongTensor` of shape `(num_images,)`): the DDPM timestep of each picture.
        noisy_latents (`torch.FloatTensor`, same shape as `latents`): the UNet input.
        model_pred (`torch.FloatTensor`, same shape): the UNet output.
        target (`torch.FloatTensor`, same shape): what `model_pred` is regressed on.
        posterior_mean, posterior_std (`torch.FloatTensor`, same shape, *optional*): the VAE posterior, when the
            latents were encoded here (not when precomputed latents were given).
    """

    loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    noise: torch.FloatTensor | None = None
    timesteps: torch.LongTensor | None = None
    noisy_latents: torch.FloatTensor | None = None
    model_pred: torch.FloatTensor | None = None
    target: torch.FloatTensor | None = None
    posterior_mean: torch.FloatTensor | None = None
    posterior_std: torch.FloatTensor | None = None


@dataclass
class DreamLLMLossOutput(ModelOutput):
    """
    Output of [`DreamLLMTrainingModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_weight_lm * lm_loss + loss_weight_vm * vm_loss`.
        lm_loss (`torch.FloatTensor` of shape `()`): next-token loss averaged over the labels that are not -100
            (0 when there are none, e.g. a text-to-image pair).
        vm_loss (`torch.FloatTensor` of shape `()`): diffusion loss (0 when the batch holds no dream block).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): language-model logits.
        dream_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, cross_attention_dim)`,
            *optional*): the UNet conditioning of every dream block, in reading order.
        diffusion (`DiffusionLossOutput`, *optional*): the intermediates of the diffusion loss.
        dream_pooled_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, pooled_projection_dim)`,
            *optional*): the pooled conditioning of every dream block (SDXL-style decoders' `text_embeds`).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    vm_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    dream_embeddings: torch.FloatTensor | None = None
    diffusion: DiffusionLossOutput | None = None
    dream_pooled_embeddings: torch.FloatTensor | None = None


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """`torch.randn` from `generator` (drawn on the generator's device, then moved) or from the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _randn_like(reference: torch.Tensor, generator) -> torch.Tensor:
    """`torch.randn_like`: the draws fill `reference`'s memory layout in order. The VAE's latents can come out
    channels-last (oneDNN on CPU does it for some batch sizes), and the original draws its noise with `randn_like`, so
    this, not `randn(shape)`, is what reproduces its noise from the same RNG state."""
    if generator is None:
        return torch.randn_like(reference)
    noise = torch.empty_like(reference, device=generator.device)
    return noise.normal_(generator=generator).to(reference.device)


def _randint(high, shape, generator, device) -> torch.Tensor:
    if generator is None:
        return torch.randint(0, high, shape, device=device)
    return torch.randint(0, high, shape, generator=generator, device=generator.device).to(device)


def encode_latents(
    vae: nn.Module,
    pixel_values: torch.Tensor,
    posterior_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Pictures in [-1, 1] -> a sample of the VAE posterior, scaled as the UNet expects: `(latents, mean, std)`.

    `latents = (mean + std * posterior_noise - shift_factor) * scaling_factor` (no shift for SD 2.1). The VAE is
    frozen: this runs without gradients. `posterior_noise` is drawn from `generator` (or the global RNG) when not given.
    """
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
        if posterior_noise is None:
            posterior_noise = _randn(mean.shape, generator, mean.device, mean.dtype)
        latents = mean + std * posterior_noise.to(device=mean.device, dtype=mean.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
    return latents, mean, std


def diffusion_loss(
    unet: nn.Module,
    noise_scheduler,
    encoder_hidden_states: torch.Tensor,
    *,
    vae: nn.Module | None = None,
    pixel_values: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    posterior_noise: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pooled_embeddings: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
) -> DiffusionLossOutput:
    """
    The noise-prediction loss of the frozen UNet conditioned on `encoder_hidden_states` (one conditioning per picture).

    Give the pictures either as `pixel_values` in [-1, 1] (encoded here with `vae`) or as precomputed scaled
    `latents`. `posterior_noise`, `noise` and `timesteps` are drawn when not given, in that order, from `generator`
    (or the global RNG): t ~ U{0, ..., num_train_timesteps - 1}, DDPM forward noising
    `sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise`. Gradients flow into `encoder_hidden_states` only
    (freeze the UNet's parameters yourself, `unet.requires_grad_(False)`).

    An SDXL-style UNet (`addition_embed_type="text_time"`) also reads `pooled_embeddings` (`(num_images,
    pooled_projection_dim)`, which then get gradients too) and the `time_ids` of the picture size: `image_size`
    `(height, width)`, by default that of `pixel_values`, or of `latents` times the VAE's scale factor. The pipelines
    condition it the same way.
    """
    posterior_mean = posterior_std = None
    if latents is None:
        if vae is None or pixel_values is None:
            raise ValueError("Pass `latents`, or `pixel_values` together with the `vae` that encodes them.")
        latents, posterior_mean, posterior_std = encode_latents(vae, pixel_values, posterior_noise, generator)
    num_images = latents.shape[0]
    if encoder_hidden_states.shape[0] != num_images:
        raise ValueError(
            f"{encoder_hidden_states.shape[0]} conditioning(s) for {num_images} picture(s): every dream block needs "
            "exactly one target picture, in reading order."
        )
    unet_dtype = next(unet.parameters()).dtype
    latents = latents.to(device=encoder_hidden_states.device, dtype=unet_dtype)
    if noise is None:
        noise = _randn_like(latents, generator)
    noise = noise.to(device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = _randint(noise_scheduler.config.num_train_timesteps, (num_images,), generator, latents.device)
    timesteps = timesteps.to(device=latents.device).long()

    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unsupported prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")

    added = None
    if takes_pooled(unet.config):
        if image_size is None:
            if pixel_values is not None:
                image_size = tuple(pixel_values.shape[-2:])
            elif vae is not None:
                image_size = tuple(side * vae_scale_factor(vae.config) for side in latents.shape[-2:])
            else:
                raise ValueError(
                    "An SDXL-style UNet reads the picture size (`time_ids`): with `latents` and no `vae`, pass "
                    "`image_size=(height, width)`."
                )
        pooled = pooled_embeddings.to(unet_dtype) if pooled_embeddings is not None else None
        added = added_cond_kwargs(unet.config, pooled, *image_size)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states.to(unet_dtype), added_cond_kwargs=added).sample
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return DiffusionLossOutput(
        loss=loss,
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        noisy_latents=noisy_latents,
        model_pred=model_pred,
        target=target,
        posterior_mean=posterior_mean,
        posterior_std=posterior_std,
    )


def _base_mllm(mllm: nn.Module) -> nn.Module:
    """The `DreamLLMForConditionalGeneration` under a PEFT wrapper (or the model itself)."""
    return mllm.get_base_model() if hasattr(mllm, "get_base_model") else mllm


class DreamLLMTrainingModel(nn.Module):
    """
    DreamLLM with its frozen diffusion decoder, as one module whose forward returns the DreamLLM loss.

    This is what `accelerate` prepares (DDP, FSDP or DeepSpeed wrap it like any `nn.Module`): the trainable parameters
    live in `mllm` (a [`DreamLLMForConditionalGeneration`], bare or under a PEFT adapter); `unet` and `vae` are frozen
    (`requires_grad=False`, kept in eval mode) and only carry gradients through to the conditioning.

    Args:
        mllm: the language model (with its vision tower, dream queries and projectors), possibly a `PeftModel`.
        unet (`UNet2DConditionModel`): the frozen denoiser; its `cross_attention_dim` is the conditioning size.
        vae (`AutoencoderKL`): the frozen autoencoder.
        noise_scheduler (`DDPMScheduler`): gives `num_train_timesteps`, `add_noise` and the prediction type.
        loss_weight_lm (`float`, defaults to 1.0), loss_weight_vm (`float`, defaults to 10.0): the two weights.
            With `loss_weight_vm=0` the diffusion branch is skipped (and `vm_loss` is 0).

    A UNet the model cannot condition (see `dreamllm_hf.decoder_conditioning`) is refused here, naming what it lacks;
    an SDXL-style UNet also gets the pooled conditioning of the model's pooled projector, which then learns.
    """

    def __init__(
        self,
        mllm: nn.Module,
        unet: nn.Module,
        vae: nn.Module,
        noise_scheduler,
        loss_weight_lm: float = DEFAULT_LOSS_WEIGHT_LM,
        loss_weight_vm: float = DEFAULT_LOSS_WEIGHT_VM,
    ):
        super().__init__()
        check_decoder(unet.config, _base_mllm(mllm).config, vae.config)
        self.mllm = mllm
        self.unet = unet.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.loss_weight_lm = loss_weight_lm
        self.loss_weight_vm = loss_weight_vm

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()  # frozen: no dropout, no norm statistics, whatever mode the rest is in
        self.vae.eval()
        return self

    def _keep_in_graph(self, no_dream_blocks: bool, no_images: bool) -> torch.Tensor | float:
        """0 x the trainable parameters of the modules a batch did not use, so every one gets a gradient every step.

        DistributedDataParallel (without `find_unused_parameters`) fails when a rank's batch leaves a trainable
        parameter unused: an all-image-to-text batch (or `loss_weight_vm=0`) never reaches the condition projector
        and maybe not the dream queries; an all-text-to-image batch never reaches the image projector; a trained vision
        tower's layers after the one read (and its pooling head) never reach the loss. (The original did the same with
        its dummy CLIP and diffusion passes.) This runs inside the forward, where FSDP has the parameters gathered. The
        result is 0.
        """
        model = _base_mllm(self.mllm).model
        modules = [model.vision_tower]  # adds nothing while the tower is frozen
        if no_dream_blocks:
            modules += [model.dream_queries, model.condition_projector]
            if getattr(model, "pooled_projector", None) is not None:
                modules.append(model.pooled_projector)
        if no_images:
            modules.append(model.multi_modal_projector)
        extra = 0.0
        for module in modules:
            for param in module.parameters():
                if param.requires_grad:
                    extra = extra + param.sum() * 0.0
        return extra

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        diffusion_pixel_values: torch.FloatTensor | None = None,
        diffusion_latents: torch.FloatTensor | None = None,
        posterior_noise: torch.FloatTensor | None = None,
        noise: torch.FloatTensor | None = None,
        timesteps: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> DreamLLMLossOutput:
        r"""
        input_ids, attention_mask, labels: the DreamLLM token stream (see `dreamllm_hf.training.data`); `labels` -100
            where nothing is learned.
        pixel_values (`(num_images, 3, H, W)`, *optional*): CLIP inputs, one per `<im_start>`, in reading order.
        diffusion_pixel_values (`(num_dream_blocks, 3, h, w)`, *optional*): the target picture of every dream block,
            in [-1, 1], in reading order; or `diffusion_latents`, already VAE-encoded and scaled.
        posterior_noise, noise, timesteps, generator: see [`diffusion_loss`]; drawn when not given.
        **kwargs: passed to the language model.
        """
        kwargs.setdefault("use_cache", False)
        outputs = self.mllm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            labels=labels,
            **kwargs,
        )
        logits = outputs.logits
        zero = logits.new_zeros((), dtype=torch.float32)
        lm_loss = outputs.loss.float() if labels is not None else zero

        dream_embeddings = outputs.dream_embeddings
        num_blocks = 0 if dream_embeddings is None else dream_embeddings.shape[0]
        targets = diffusion_latents if diffusion_latents is not None else diffusion_pixel_values
        num_targets = 0 if targets is None else targets.shape[0]
        if num_blocks != num_targets:
            raise ValueError(
                f"The batch holds {num_blocks} dream block(s) but {num_targets} target picture(s) were given in "
                "`diffusion_pixel_values`/`diffusion_latents`; give one picture per `<dream_start>`, in reading order."
            )

        diffusion = None
        vm_loss = zero
        if num_blocks and self.loss_weight_vm != 0:
            diffusion = diffusion_loss(
                self.unet,
                self.noise_scheduler,
                dream_embeddings,
                vae=self.vae,
                pixel_values=diffusion_pixel_values,
                latents=diffusion_latents,
                posterior_noise=posterior_noise,
                noise=noise,
                timesteps=timesteps,
                generator=generator,
                pooled_embeddings=outputs.dream_pooled_embeddings,
            )
            vm_loss = diffusion.loss

        loss = self.loss_weight_lm * lm_loss + self.loss_weight_vm * vm_loss
        if self.training and torch.is_grad_enabled():
            loss = loss + self._keep_in_graph(no_dream_blocks=diffusion is None, no_images=pixel_values is None)
        return DreamLLMLossOutput(
            loss=loss,
            lm_loss=lm_loss,
            vm_loss=vm_loss,
            logits=logits,
            dream_embeddings=dream_embeddings,
            diffusion=diffusion,
            dream_pooled_embeddings=outputs.dream_pooled_embeddings,
        )


def dreamllm_loss(
    mllm: nn.Module,
    unet: nn.Module,
    vae: nn.Module,
    noise_scheduler,
    batch: dict,
    loss_weight_lm: float = DEFAULT_LOSS_WEIGHT_LM,
    loss_weight_vm: float = DEFAULT_LOSS_WEIGHT_VM,
    **kwargs,
) -> DreamLLMLossOutput:
    """Functional form of [`DreamLLMTrainingModel`]: the DreamLLM loss of one collated `batch`."""
    module = DreamLLMTrainingModel(mllm, unet, vae, noise_scheduler, loss_weight_lm, loss_weight_vm)
    module.training = mllm.training
    return module(**batch, **kwargs)


__all__ = [
    "DEFAULT_LOSS_WEIGHT_LM",
    "DEFAULT_LOSS_WEIGHT_VM",
    "DiffusionLossOutput",
    "DreamLLMLossOutput",
    "DreamLLMTrainingModel",
    "diffusion_loss",
    "dreamllm_loss",
    "encode_latents",
]
