"""UNet LoRAs in diffusers' format on every DreamLLM pipeline that draws, through diffusers' Stable Diffusion loader.

DreamLLM has no CLIP text encoder: its prompts are read by the `mllm`, whose dream queries condition the UNet. So of a
Stable Diffusion LoRA only the UNet part applies; a text-encoder part is left out with a warning (the `mllm` takes its
own LoRAs through peft or transformers' `load_adapter`, never through this path).
"""

import logging
import os

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import USE_PEFT_BACKEND


logger = logging.getLogger(__name__)

# How diffusers prefixes the text encoders' keys in a LoRA file (kohya's `lora_te*_` keys are converted to these).
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# The UNet's attribute holding, while a LoRA is fused, the weights it replaced (on the unet: pipelines share it).
WEIGHTS_BEFORE_FUSING = "_dreamllm_weights_before_fusing"


class DreamLLMLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    r"""
    `load_lora_weights`, `fuse_lora`/`unfuse_lora`, `unload_lora_weights`, `set_adapters` (and the rest of diffusers'
    LoRA methods: `disable_lora`, `delete_adapters`, `get_active_adapters`, ...) for the pipeline's `unet`, as
    `StableDiffusionPipeline` has them. Needs `peft`.

    The `unet` is the only LoRA-loadable component. A LoRA file's text-encoder keys (`text_encoder.*`, or kohya's
    `lora_te_*`) have nothing to act on here and are left out with a warning; a file with no UNet keys is refused.
    Pipelines built `from_pipe` share the `unet` object, so a LoRA loaded on one acts on all of them (the pictures
    of `DreamLLMPipeline`'s documents included).
    """

    _lora_loadable_modules = ["unet"]

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Loads a UNet LoRA into `self.unet` as an adapter (peft), diffusers' way.

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`):
                A folder or Hub id holding the LoRA file, or its state dict; see
                [`~loaders.StableDiffusionLoraLoaderMixin.lora_state_dict`] (`weight_name=`, `subfolder=`, ...; kohya
                and diffusers formats).
            adapter_name (`str`, *optional*):
                The adapter's name for `set_adapters`, `delete_adapters`, ...; `default_{i}` when left out.
            hotswap (`bool`, defaults to `False`):
                Replace the weights of the already loaded adapter `adapter_name` in place (see diffusers).
            **kwargs: `low_cpu_mem_usage`, and what `lora_state_dict` takes.
        """
        if not USE_PEFT_BACKEND:
            raise ValueError("Loading a LoRA needs peft: `pip install peft` (or the package's `train` extra).")
        unet = getattr(self, self.unet_name, None)
        if unet is None:
            raise ValueError(
                f"This {type(self).__name__} has no `unet` (a text-only pipeline), so there is nothing to load a LoRA "
                "into; load the pipeline with its unet, vae and scheduler."
            )
        # diffusers' default where peft can (>= 0.13; the `train` extra asks for 0.17): no random init of the LoRA first.
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", True)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            # diffusers' loader pops from the dict it is given; leave the caller's alone.
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, network_alphas, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every key of a LoRA state dict has `lora` in its name.")

        unet_prefix = f"{self.unet_name}."
        text_encoder_keys = [key for key in state_dict if key.startswith(TEXT_ENCODER_PREFIXES)]
        if not any(key.startswith(unet_prefix) for key in state_dict):
            found = "text-encoder keys only" if text_encoder_keys else f"keys such as {next(iter(state_dict), None)!r}"
            raise ValueError(
                f"The LoRA has no UNet weights (keys starting with {unet_prefix!r}); it has {found}. DreamLLM takes "
                "UNet LoRAs in diffusers' or kohya's format."
            )
        if text_encoder_keys:
            logger.warning(
                "Left out the %d text-encoder keys of the LoRA: DreamLLM has no CLIP text encoder (its prompts are read "
                "by the mllm, whose dream queries condition the UNet), so only the UNet part is loaded.",
                len(text_encoder_keys),
            )
        # The UNet's loader keeps the keys under `unet.` (and their alphas), so the text-encoder part goes no further.
        self.load_lora_into_unet(
            state_dict,
            network_alphas=network_alphas,
            unet=unet,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        r"""
        Merges the active LoRAs into the UNet's weights (faster drawing; `unfuse_lora` takes them out again).

        Unlike diffusers, which subtracts the LoRA again on `unfuse_lora` (close to, but not exactly, the weights
        before), the weights the LoRA touches are kept in CPU memory while fused, and `unfuse_lora` puts them back as
        they were, bit for bit. `unload_lora_weights` while fused keeps the fused weights (diffusers' way to bake a
        LoRA in) and drops the copies.

        Args:
            components (`list[str]`, defaults to `["unet"]`): the only LoRA-loadable component.
            lora_scale (`float`, defaults to 1.0): how strongly the LoRA acts.
            safe_fusing (`bool`, defaults to `False`): check the fused weights for NaN first, and leave them unfused.
            adapter_names (`list[str]`, *optional*): the adapters to fuse; all active ones when left out.
        """
        components = list(components or self._lora_loadable_modules)
        unet = getattr(self, self.unet_name, None)
        if self.unet_name in components and unet is not None:
            kept = unet.__dict__.setdefault(WEIGHTS_BEFORE_FUSING, {})
            for name, layer in _lora_layers(unet):
                if name not in kept and not layer.merged_adapters:  # already merged: its copy is older
                    kept[name] = {
                        key: tensor.detach().to("cpu", copy=True)
                        for key, tensor in layer.get_base_layer().named_parameters(recurse=False)
                        if tensor.is_floating_point() and tensor.device.type != "meta"
                    }
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        r"""
        Takes fused LoRAs out of the UNet's weights again, restoring the weights it had before `fuse_lora` exactly
        (`components` defaults to `["unet"]`).
        """
        components = list(components or self._lora_loadable_modules)
        super().unfuse_lora(components=components, **kwargs)
        unet = getattr(self, self.unet_name, None)
        kept = getattr(unet, WEIGHTS_BEFORE_FUSING, None)
        if self.unet_name not in components or kept is None:
            return
        with torch.no_grad():
            for name, layer in _lora_layers(unet):
                if name in kept and not layer.merged_adapters:
                    for key, tensor in layer.get_base_layer().named_parameters(recurse=False):
                        if key in kept[name]:
                            tensor.copy_(kept[name][key])
                    del kept[name]
        if not kept:
            del unet.__dict__[WEIGHTS_BEFORE_FUSING]

    def unload_lora_weights(self):
        r"""
        Removes every LoRA from the UNet (a fused one stays in its weights, as in diffusers).
        """
        super().unload_lora_weights()
        unet = getattr(self, self.unet_name, None)
        if unet is not None:
            unet.__dict__.pop(WEIGHTS_BEFORE_FUSING, None)


def _lora_layers(unet: torch.nn.Module):
    """The UNet's peft layers (those that wrap a base layer), by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
