"""canet: kernels for per-user routed sequential recommenders.

`import canet_kernels` registers torch.ops.canet.* (the compiled library) and
their autograd and fake kernels. `python -m canet_kernels.info` says which
backends are built and usable.
"""
from ._library import load_error  # noqa: F401

__version__ = "0.1.0"

try:
    from . import ops  # noqa: F401  registers fakes and autograd
    from .functional import (  # noqa: F401
        pack, sliced_add_layernorm, sliced_attention, sliced_ffn,
        sliced_linear, unpack)
except ImportError:  # the library is not built: info says why
    pass
