"""Helpers for tests and benchmarks, as `transformers.testing_utils` and `diffusers.utils.testing_utils` are: one
factory of tiny components, built offline and seeded. `factories` builds DreamLLM itself (config, model, tokenizer,
processor, pipeline), `backbones` the LLM and vision families it can be built from, `decoders` the diffusion decoder
(one UNet builder for every kind, one VAE, one scheduler). Every public name is exported here, each from one module."""

from . import backbones, decoders, factories
from .backbones import *
from .decoders import *
from .factories import *


__all__ = [*backbones.__all__, *decoders.__all__, *factories.__all__]
