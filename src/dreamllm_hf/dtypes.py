"""The floating-point dtypes that every `--dtype` option and `dtype="..."` string names: one table for the package.

Names only, so that the table itself needs no torch; `parse_dtype` turns a name into the torch dtype.
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def parse_dtype(dtype, argument: str = "dtype"):
    """The torch dtype `dtype` names (one of `DTYPE_NAMES`); a `torch.dtype` or None is returned as it is.

    Args:
        dtype (`str`, `torch.dtype` or `None`): what was given.
        argument (`str`, defaults to `"dtype"`): the argument's name, for the error message.
    """
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, DTYPE_NAMES))}; got {dtype!r}.")
    return getattr(torch, dtype)


__all__ = ["DTYPE_NAMES", "parse_dtype"]
