"""Batches drawn from several data sources in set proportions, each batch from one source.

Concatenating sources and shuffling mixes them in proportion to their sizes, and a batch then pads short samples
(pairs) to its longest one (a document). `SourceMixtureBatchSampler` instead gives each source a share of the batches
(`weights`), every batch from one source: a small set of documents can make three quarters of the batches next to a
large set of pairs, and a batch of pairs costs what pairs cost.

An epoch takes each source in a fresh seeded order, without repeating a sample: the source whose share runs out first
(fewest batches per unit of weight) is used up, the others take their share of as many batches, and the order of the
batches is shuffled. So the per-sample randomness, seeded by `(seed, epoch, index)`, never repeats within an epoch,
and `set_epoch` gives another order, another subset of the larger sources and other per-sample draws.
"""

from collections.abc import Iterator, Sequence

import numpy as np


class SourceMixtureBatchSampler:
    """
    Batch sampler over a dataset made of sources laid end to end (as [`DreamLLMDataset`] concatenates them).

    Args:
        source_lengths (`Sequence[int]`): number of samples of each source, in dataset order.
        weights (`Sequence[float]`): share of the batches of each source (any positive scale; 0 leaves a source out).
        batch_size (`int`): samples per batch (the last batch of a used-up source may be shorter).
        seed (`int`, defaults to 0): seeds the orders, with the epoch.
    """

    def __init__(self, source_lengths: Sequence[int], weights: Sequence[float], batch_size: int, seed: int = 0):
        if len(weights) != len(source_lengths):
            raise ValueError(
                f"`data_weights` has {len(weights)} weight(s) for {len(source_lengths)} data source(s); give one "
                "weight per source, in the order of `data`."
            )
        if any(weight < 0 for weight in weights) or not any(weight > 0 for weight in weights):
            raise ValueError(f"`data_weights` must be >= 0 with at least one > 0, got {list(weights)}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        empty = [index for index, (length, weight) in enumerate(zip(source_lengths, weights)) if weight and not length]
        if empty:
            raise ValueError(f"Data source(s) {empty} are empty but have a weight.")
        self.source_lengths = list(source_lengths)
        total = float(sum(weights))
        self.weights = [weight / total for weight in weights]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offsets = np.concatenate([[0], np.cumsum(self.source_lengths)[:-1]]).astype(int).tolist()
        available = [-(-length // batch_size) for length in self.source_lengths]  # batches without repeating a sample
        limit = min(batches / weight for batches, weight in zip(available, self.weights) if weight)
        self.batches_per_source = [
            min(available[s], max(1, int(limit * weight + 1e-9))) if weight else 0
            for s, weight in enumerate(self.weights)
        ]
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.batches_per_source)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for source, count in enumerate(self.batches_per_source):
            if not count:
                continue
            order = rng.permutation(self.source_lengths[source]) + self.offsets[source]
            batches += [order[k * self.batch_size : (k + 1) * self.batch_size].tolist() for k in range(count)]
        for index in rng.permutation(len(batches)):
            yield batches[index]


__all__ = ["SourceMixtureBatchSampler"]
