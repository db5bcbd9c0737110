"""Helpers for tests and benchmarks, as `transformers.testing_utils` and `diffusers.utils.testing_utils` are: tiny
components built offline (`factories`). Importing this package needs diffusers only when a diffusion part is built."""

from . import factories
from .factories import *


__all__ = [*factories.__all__]
