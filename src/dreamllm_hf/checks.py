"""Checks of the numbers people pass: one range per kind of argument, for the Python API and the command lines alike.

A pipeline's `check_inputs` calls `STEPS.check("num_inference_steps", value)`; a command line declares
`parser.add_argument("--steps", type=STEPS.parse)`, and argparse turns a bad value into a one-line error and exit
code 2. Both say the same thing, because the range is written once, here.
"""

import argparse
import math
import numbers
from dataclasses import dataclass
from typing import Any, NoReturn


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type: a `TypeError`, and a `ValueError` so that code catching the pipelines' input
    errors (`except ValueError`, as the command lines do) sees every bad input."""


def _plain(number) -> str:
    """`1e-08`, `0`, `1`, `2**64 - 1`: a bound as people read it."""
    if isinstance(number, int) and number >= 2**32:
        power = number.bit_length()
        if number == 2**power - 1:
            return f"2**{power} - 1"
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


@dataclass(frozen=True)
class NumberRange:
    """What one kind of number may be: an integer or a finite real number, between optional bounds.

    Args:
        integer (`bool`): whole numbers only (`bool` is refused either way).
        minimum (`float`, *optional*): the lower bound (`None`: unbounded).
        maximum (`float`, *optional*): the upper bound (`None`: unbounded).
        exclusive_minimum (`bool`, defaults to `False`): whether `minimum` itself is refused.
        exclusive_maximum (`bool`, defaults to `False`): whether `maximum` itself is refused.
    """

    integer: bool
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    @property
    def description(self) -> str:
        """`a positive integer`, `a finite number in [0, 1]`, ... (what the messages say is expected)."""
        low, high = self.minimum, self.maximum
        if self.integer and high is None and low in (0, 1) and not self.exclusive_minimum:
            return "a positive integer" if low == 1 else "a non-negative integer"
        kind = "an integer" if self.integer else "a finite number"
        if low is not None and high is not None:
            left, right = "(" if self.exclusive_minimum else "[", ")" if self.exclusive_maximum else "]"
            return f"{kind} in {left}{_plain(low)}, {_plain(high)}{right}"
        if low is not None:
            return f"{kind} {'>' if self.exclusive_minimum else '>='} {_plain(low)}"
        if high is not None:
            return f"{kind} {'<' if self.exclusive_maximum else '<='} {_plain(high)}"
        return kind

    def _in_range(self, value) -> bool:
        low, high = self.minimum, self.maximum
        if low is not None and (value <= low if self.exclusive_minimum else value < low):
            return False
        return high is None or (value < high if self.exclusive_maximum else value <= high)

    def check(self, name: str, value: Any, optional: bool = False):
        """`value` as it is when it fits; else an `InputTypeError` (wrong type) or a `ValueError` (not finite, out
        of range) naming `name`, what was given and what is expected. `optional=True` lets `None` through."""
        if value is None and optional:
            return value
        expected = self.description + (" or None" if optional else "")
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputTypeError(f"`{name}` must be {expected}, got {value!r} ({type(value).__name__}).")
        if not self.integer and not math.isfinite(value):
            raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
        if not self._in_range(value):
            raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
        return value

    def parse(self, text: str):
        """An argparse `type=`: the number in `text`, or an `ArgumentTypeError` argparse reports as
        `argument --NAME: must be ..., got 'TEXT'` (exit code 2)."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            value = None
        if value is None or (not self.integer and not math.isfinite(value)) or not self._in_range(value):
            raise argparse.ArgumentTypeError(f"must be {self.description}, got {text!r}")
        return value


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """A bad option found after parsing (against the model it meets, say): argparse's one-line error and exit code 2,
    from the sub-command's parser when it set itself as `parser` in the namespace (`parser.set_defaults`)."""
    parser = getattr(args, "parser", None)
    if not isinstance(parser, argparse.ArgumentParser):
        parser = argparse.ArgumentParser(prog="dreamllm-hf")
    parser.error(message)


POSITIVE_INT = NumberRange(integer=True, minimum=1)
NON_NEGATIVE_INT = NumberRange(integer=True, minimum=0)
POSITIVE_NUMBER = NumberRange(integer=False, minimum=0, exclusive_minimum=True)
NON_NEGATIVE_NUMBER = NumberRange(integer=False, minimum=0)
PROBABILITY = NumberRange(integer=False, minimum=0, maximum=1)

# What torch's and numpy's generators both take (numpy refuses negative seeds).
SEED = NumberRange(integer=True, minimum=0, maximum=2**64 - 1)
PORT = NumberRange(integer=True, minimum=1, maximum=65535)

# The pipelines' arguments (and the command-line options that set them)
STEPS = POSITIVE_INT  # num_inference_steps
GUIDANCE_SCALE = NON_NEGATIVE_NUMBER  # <= 1 turns guidance off
GUIDANCE_RESCALE = PROBABILITY  # the phi of "Common Diffusion Noise Schedules" (arXiv 2305.08891)
ETA = PROBABILITY  # DDIM's eta: 0 deterministic, 1 DDPM-like
STRENGTH = PROBABILITY  # img2img and inpainting: how far the picture is noised (1: from noise)
TEMPERATURE = POSITIVE_NUMBER
TOP_P = NumberRange(integer=False, minimum=0, maximum=1, exclusive_minimum=True)
TOP_K = NON_NEGATIVE_INT  # 0: off, as transformers reads it
REPETITION_PENALTY = POSITIVE_NUMBER
MAX_NEW_TOKENS = POSITIVE_INT
MAX_IMAGES = NON_NEGATIVE_INT
NUM_IMAGES_PER_PROMPT = POSITIVE_INT
PICTURE_SIDE = POSITIVE_INT  # height, width; the multiple they must be is checked against the VAE and UNet
BATCH_SIZE = POSITIVE_INT
# A Ray Serve replica runs the pipeline on one device: up to a whole GPU, or a share of one (0.5: two replicas a GPU).
GPUS_PER_REPLICA = NumberRange(integer=False, minimum=0, maximum=1)


__all__ = [
    "BATCH_SIZE",
    "ETA",
    "GPUS_PER_REPLICA",
    "GUIDANCE_RESCALE",
    "GUIDANCE_SCALE",
    "InputTypeError",
    "MAX_IMAGES",
    "MAX_NEW_TOKENS",
    "NON_NEGATIVE_INT",
    "NON_NEGATIVE_NUMBER",
    "NUM_IMAGES_PER_PROMPT",
    "NumberRange",
    "PICTURE_SIDE",
    "PORT",
    "POSITIVE_INT",
    "POSITIVE_NUMBER",
    "PROBABILITY",
    "REPETITION_PENALTY",
    "SEED",
    "STEPS",
    "STRENGTH",
    "TEMPERATURE",
    "TOP_K",
    "TOP_P",
    "usage_error",
]
