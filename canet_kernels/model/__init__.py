"""CANet model: a weight-sliced SASRec-style supernet, a light router and the
losses (CE, guide, uniform, compute budget), on the module layer of
`encoder` (RoutedLayer, RoutedEncoder, DenseEncoder, CANetEncoder)."""
from .canet import CANet, Routing  # noqa: F401
from .config import CANetConfig  # noqa: F401
from .encoder import (CANetEncoder, DenseEncoder, EncoderOutput,  # noqa: F401
                      RoutedEncoder, RoutedLayer, Routes)
from .router import Router  # noqa: F401
from .supernet import Supernet  # noqa: F401
