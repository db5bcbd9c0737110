"""The networks whose features FID compares: the FID Inception read from a local file, or a transformers vision model.

Both are `nn.Module`s that take a batch of pictures as `uint8` tensors `[B, 3, H, W]` and return `[B, D]` features,
the form torchmetrics' `FrechetInceptionDistance(feature=module)` takes; the statistics and the distance are
torchmetrics' own for either.

The Inception is the TensorFlow FID network (2015-12-05 graph) that pytorch-fid, clean-fid and StyleGAN's metrics
reproduce, as the TorchScript file `inception-2015-12-05.pt` that clean-fid and StyleGAN2-ADA load (clean-fid fetches
it on its first run). Weights cannot be downloaded at run time here, so it is always read from
`--inception-weights FILE`. torch-fidelity's state-dict weights are not read: torch-fidelity imports torchvision, whose
PyPI wheels are CUDA builds that fail to load beside the CPU torch (and then break `transformers`' CLIP import).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import nn


INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
INCEPTION_HELP = (
    f"the TorchScript FID Inception `{INCEPTION_FILE_NAME}` (the TensorFlow 2015-12-05 network as clean-fid and "
    "StyleGAN2-ADA load it; clean-fid fetches it on its first run)"
)


def fit_to_resolution(picture: PIL.Image.Image, resolution: int | None) -> PIL.Image.Image:
    """The centre square of `picture` at `resolution`² (bicubic), as FID at a given size is measured."""
    picture = picture.convert("RGB")
    if resolution is None or picture.size == (resolution, resolution):
        return picture
    return PIL.ImageOps.fit(picture, (resolution, resolution), method=PIL.Image.Resampling.BICUBIC)


def pictures_to_uint8(pictures: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """RGB pictures of one size -> `uint8` `[B, 3, H, W]`."""
    sizes = {picture.size for picture in pictures}
    if len(sizes) != 1:
        raise ValueError(f"pictures of one batch must share a size (got {sorted(sizes)}); give a --resolution.")
    array = np.stack([np.asarray(picture.convert("RGB"), dtype=np.uint8) for picture in pictures])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def uint8_to_pictures(images: torch.Tensor) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]


class InceptionFeatures(nn.Module):
    """The 2048 pool features of the TorchScript FID Inception; it resizes to 299² itself."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise SystemExit(f"error: --inception-weights {path} does not exist; give {INCEPTION_HELP}.")
        try:
            # TorchScript runs no Python on load (unlike a pickle), so a downloaded file is safe to read.
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:
            raise SystemExit(
                f"error: --inception-weights {path} is not a TorchScript file ({str(error).splitlines()[0]}); give "
                f"{INCEPTION_HELP}."
            ) from error

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network(images, return_features=True)
        return features.reshape(images.shape[0], -1).float()


def pooled_features(output) -> torch.Tensor:
    """One vector per picture from what a transformers vision model returns."""
    if isinstance(output, torch.Tensor):
        features = output
    else:
        features = None
        for name in ("image_embeds", "pooler_output", "last_hidden_state"):
            features = getattr(output, name, None)
            if features is not None:
                break
        if features is None:
            raise ValueError(f"cannot find picture features in a {type(output).__name__}.")
    # Token features ([B, N, D], e.g. DreamLLM's or Llava's get_image_features) are averaged over the tokens.
    return features.mean(dim=1) if features.dim() == 3 else features.flatten(1)


class TransformersImageFeatures(nn.Module):
    """
    Picture features of a transformers model folder (its image processor, then `get_image_features` where the model
    has it, e.g. CLIP's projected embedding, otherwise its pooled output): FID-CLIP when the folder is a CLIP.
    """

    def __init__(self, folder: str | Path):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise SystemExit(
                f"error: --feature-model {folder} has no config.json; give a transformers model folder with its "
                "image processor (e.g. `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`)."
            )
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"error: --feature-model {folder} has no image processor ({error}); save one beside the model."
            ) from error
        self.model = AutoModel.from_pretrained(folder).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.processor(images=uint8_to_pictures(images), return_tensors="pt")
        parameter = next(self.model.parameters())
        pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        return pooled_features(output).float()


def load_feature_network(
    inception_weights: str | Path | None, feature_model: str | Path | None
) -> tuple[nn.Module, str]:
    """The feature network and its name for the scores ("inception" or "features:<folder name>")."""
    if (inception_weights is None) == (feature_model is None):
        raise SystemExit(
            f"error: give --inception-weights FILE ({INCEPTION_HELP}) for FID, or --feature-model DIR (a transformers "
            "vision model such as CLIP) for a FID on its features; exactly one of them."
        )
    if inception_weights is not None:
        return InceptionFeatures(inception_weights), "inception"
    return TransformersImageFeatures(feature_model), f"features:{Path(feature_model).name}"


__all__ = [
    "INCEPTION_FILE_NAME",
    "InceptionFeatures",
    "TransformersImageFeatures",
    "fit_to_resolution",
    "load_feature_network",
    "pictures_to_uint8",
    "pooled_features",
]
