"""The notices that importing diffusers prints on every start, though nothing the user of this package asked for
triggers them and nothing they do with it can act on them; dropped while the package imports diffusers, and only
those.

* bitsandbytes: diffusers imports it whenever it is installed (`diffusers.quantizers`), and on a CPU with AVX512-BF16
  its import tries to fetch an optional 4-bit matmul kernel from the Hub (`kernels-community`) and logs that it could
  not. Nothing here needs that kernel: bitsandbytes' own CPU code runs 4-bit layers without it.
* transformers: `diffusers`' Stable Diffusion pipeline and IP-Adapter loader import `CLIPImageProcessor` and
  `SiglipImageProcessor` (and its Auto pipelines, which this package registers with, `Siglip2ImageProcessor`);
  without torchvision, transformers gives them the PIL classes and says so. The processors of this package run on PIL
  images either way.

Every other record of those loggers, and everything logged after the import, is left alone.
"""

import contextlib
import logging


# Logger name -> the beginnings of the messages dropped from it.
IMPORT_NOTICES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "transformers.utils.import_utils": (
        "`CLIPImageProcessor` requires torchvision (not installed)",
        "`SiglipImageProcessor` requires torchvision (not installed)",
        "`Siglip2ImageProcessor` requires torchvision (not installed)",
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, beginnings: tuple[str, ...]):
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.beginnings)


@contextlib.contextmanager
def dropped_import_notices():
    """Drops the `IMPORT_NOTICES` logged inside the `with` block (by the imports it runs)."""
    filters = {name: _DropMessages(beginnings) for name, beginnings in IMPORT_NOTICES.items()}
    for name, drop in filters.items():
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name, drop in filters.items():
            logging.getLogger(name).removeFilter(drop)
