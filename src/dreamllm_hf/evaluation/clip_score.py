"""CLIP score of pictures against their captions, and choosing the best of several pictures by it.

The scores are torchmetrics' (`CLIPScore`: 100 × the cosine of CLIP's picture and caption embeddings) with a CLIP read
from a local folder. The paper keeps, for every caption, the best of 8 pictures by CLIP ViT-L/14's score before FID.
"""

from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from .features import pictures_to_uint8, pooled_features


class _TensorFeatures(nn.Module):
    """
    A CLIP whose `get_image_features`/`get_text_features` return tensors: transformers 5 returns a
    `BaseModelOutputWithPooling` (projected embedding in `pooler_output`), torchmetrics 1.9 expects the tensor.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return pooled_features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return pooled_features(self.model.get_text_features(*args, **kwargs))


def load_clip(folder: str | Path):
    """A CLIP-like model (with `get_image_features` and `get_text_features`) and its processor from a local folder."""
    from transformers import AutoModel, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"error: {folder} has no config.json; give a local CLIP folder (model and processor saved with "
            "save_pretrained, e.g. openai/clip-vit-large-patch14 downloaded beforehand)."
        )
    model = AutoModel.from_pretrained(folder).eval().requires_grad_(False)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise SystemExit(
            f"error: {folder} holds a {type(model).__name__}, not a CLIP-like model with text and pictures."
        )
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {folder} has no processor (tokenizer + image processor): {error}") from error
    return model, processor


class CLIPScorer:
    """CLIP scores from torchmetrics with a local CLIP; `batch_size` pairs per model call."""

    def __init__(self, folder: str | Path, device=None, batch_size: int = 64):
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = load_clip(folder)
        self.folder = Path(folder)
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self._model = _TensorFeatures(model).to(self.device)
        self._processor = processor
        # sync_on_compute=False: only the main process scores.
        self.metric = CLIPScore(model_name_or_path=lambda: (self._model, self._processor), sync_on_compute=False)

    def _tensors(self, pictures: Sequence[PIL.Image.Image]) -> list[torch.Tensor]:
        # One tensor per picture: sizes may differ, the processor resizes.
        return [pictures_to_uint8([picture])[0].to(self.device) for picture in pictures]

    @torch.no_grad()
    def scores(self, pictures: Sequence[PIL.Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """One score per (picture, caption) pair, 100 × cosine (not clamped)."""
        # torchmetrics' public API returns only the mean; choosing a picture needs each pair's score, which its
        # update function computes (the same code path as `CLIPScore`).
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        if len(pictures) != len(captions):
            raise ValueError(f"{len(pictures)} pictures but {len(captions)} captions.")
        scores = []
        for start in range(0, len(pictures), self.batch_size):
            images = self._tensors(pictures[start : start + self.batch_size])
            score, _ = _clip_score_update(
                images, list(captions[start : start + self.batch_size]), self._model, self._processor
            )
            scores.append(score.float().cpu())
        return torch.cat(scores)

    @torch.no_grad()
    def mean_score(self, pictures: Sequence[PIL.Image.Image], captions: Sequence[str]) -> float:
        """torchmetrics' `CLIPScore` over all pairs (the mean, clamped at 0)."""
        self.metric.reset()
        for start in range(0, len(pictures), self.batch_size):
            images = self._tensors(pictures[start : start + self.batch_size])
            self.metric.update(images, list(captions[start : start + self.batch_size]))
        return float(self.metric.compute())


def select_best(scores: torch.Tensor) -> int:
    """Index of the best-scoring picture (the first one on ties)."""
    return int(torch.argmax(scores))


__all__ = ["CLIPScorer", "load_clip", "select_best"]
