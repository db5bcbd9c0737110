"""FID between generated pictures and a reference, on torchmetrics' `FrechetInceptionDistance`.

torchmetrics keeps the feature sums and the sums of outer products of both sets and computes the mean, the covariance
and the Fréchet distance; this module only feeds it pictures (at the protocol's resolution) and reference statistics.
Reference statistics are read from a `.npz` with `mu` and `sigma` as pytorch-fid writes them (the unbiased covariance),
or measured on a folder of reference pictures and optionally saved in that format for the next run.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import open_pictures
from .features import fit_to_resolution, pictures_to_uint8


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A reference `.npz` carries no sample count; any count >= 2 gives torchmetrics back the same mean and covariance.
_STATS_COUNT = 2


def picture_files(folder: Path) -> list[Path]:
    """The pictures of `folder` (not its sub-folders), sorted by name."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder of pictures.")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in PICTURE_SUFFIXES and path.is_file())
    if len(files) < 2:
        raise SystemExit(
            f"error: {folder} holds {len(files)} picture(s); FID needs at least 2 ({', '.join(PICTURE_SUFFIXES)})."
        )
    return files


def load_statistics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu` [D] and `sigma` [D, D] of a pytorch-fid `.npz`."""
    try:
        with np.load(path, allow_pickle=False) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise SystemExit(
                    f"error: {path} has the arrays {', '.join(stats.files)}; reference statistics need 'mu' and "
                    "'sigma' as pytorch-fid writes them (or give a folder of reference pictures)."
                )
            mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot read reference statistics {path}: {error}") from error
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise SystemExit(f"error: {path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not describe one distribution.")
    return mu, sigma


def save_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, **metadata) -> None:
    """pytorch-fid's layout (`mu`, `sigma`) plus scalar metadata arrays (feature network, resolution, count)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, mu=mu, sigma=sigma, **{key: np.asarray(value) for key, value in metadata.items()})


class FIDScorer:
    """
    Feeds pictures to a `FrechetInceptionDistance` with the given feature network.

    Args:
        feature_network: an `nn.Module` taking `uint8` `[B, 3, R, R]` and returning `[B, D]` (see `features.py`).
        resolution: every picture is centre-cropped and resized to this square first (None: as they are, one size).
        batch_size: pictures per feature-network call.
    """

    def __init__(self, feature_network: nn.Module, resolution: int | None = 256, batch_size: int = 50, device=None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.resolution = resolution
        self.batch_size = batch_size
        self.device = torch.device(device or "cpu")
        probe = resolution or 64
        # sync_on_compute=False: only the main process scores; the others must not be waited for.
        self.metric = FrechetInceptionDistance(
            feature=feature_network.to(self.device),
            input_img_size=(3, probe, probe),
            reset_real_features=False,  # `reset_generated` keeps the reference: one reference, several sets
            sync_on_compute=False,
        ).to(self.device)

    def _add(self, pictures: Iterable[PIL.Image.Image], real: bool, total: int | None, desc: str) -> None:
        batch = []
        with tqdm(total=total, desc=desc, unit="pic", leave=False) as progress:
            for picture in pictures:
                batch.append(fit_to_resolution(picture, self.resolution))
                if len(batch) == self.batch_size:
                    self.metric.update(pictures_to_uint8(batch).to(self.device), real=real)
                    progress.update(len(batch))
                    batch = []
            if batch:
                self.metric.update(pictures_to_uint8(batch).to(self.device), real=real)
                progress.update(len(batch))

    def add_generated(self, pictures: Iterable[PIL.Image.Image], total: int | None = None) -> None:
        self._add(pictures, real=False, total=total, desc="FID: generated")

    def add_reference(self, pictures: Iterable[PIL.Image.Image], total: int | None = None) -> None:
        self._add(pictures, real=True, total=total, desc="FID: reference")

    def add_reference_files(self, files: Sequence[Path]) -> None:
        self.add_reference(open_pictures(files), total=len(files))

    def set_reference_statistics(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        """Puts `mu`/`sigma` into torchmetrics' running sums so that its `compute` reads them back."""
        metric = self.metric
        size = metric.real_features_sum.shape[0]
        if mu.shape[0] != size:
            raise SystemExit(
                f"error: the reference statistics have {mu.shape[0]} features but the feature network gives {size}; "
                "compute them with the same network (2048 for the Inception)."
            )
        count = _STATS_COUNT
        mean = torch.as_tensor(mu, dtype=torch.float64, device=metric.real_features_sum.device)
        covariance = torch.as_tensor(sigma, dtype=torch.float64, device=mean.device)
        metric.real_features_sum = mean * count
        metric.real_features_cov_sum = covariance * (count - 1) + count * torch.outer(mean, mean)
        metric.real_features_num_samples = torch.tensor(count, device=mean.device)

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean, unbiased covariance and count of one set, from torchmetrics' running sums."""
        prefix = "real" if real else "fake"
        count = int(getattr(self.metric, f"{prefix}_features_num_samples"))
        if count < 2:
            raise RuntimeError(f"the {'reference' if real else 'generated'} set has {count} picture(s); FID needs 2.")
        total = getattr(self.metric, f"{prefix}_features_sum")
        products = getattr(self.metric, f"{prefix}_features_cov_sum")
        mean = total / count
        covariance = (products - count * torch.outer(mean, mean)) / (count - 1)
        return mean.cpu().numpy(), covariance.cpu().numpy(), count

    def reset_generated(self) -> None:
        """Forgets the generated pictures (the reference stays), to score another set."""
        self.metric.reset()

    def compute(self) -> float:
        for real, name in ((True, "reference"), (False, "generated")):
            count = int(getattr(self.metric, f"{'real' if real else 'fake'}_features_num_samples"))
            if count < 2:
                raise SystemExit(f"error: the {name} set has {count} picture(s); FID needs at least 2.")
        return float(self.metric.compute())


def load_reference(scorer: FIDScorer, reference: Path) -> dict:
    """Statistics of `reference` (a `.npz` or a folder of pictures) into `scorer`; returns what was read."""
    if reference.is_dir():
        files = picture_files(reference)
        scorer.add_reference_files(files)
        return {"reference": str(reference), "reference_pictures": len(files)}
    if reference.suffix.lower() == ".npz" and reference.is_file():
        mu, sigma = load_statistics(reference)
        scorer.set_reference_statistics(mu, sigma)
        return {"reference": str(reference), "reference_pictures": None}
    raise SystemExit(
        f"error: --reference {reference} is neither a folder of pictures nor an existing .npz of statistics "
        "(mu, sigma as pytorch-fid writes them)."
    )


__all__ = ["FIDScorer", "load_reference", "load_statistics", "picture_files", "save_statistics"]
