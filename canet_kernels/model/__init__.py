"""CANet model: a weight-sliced SASRec-style supernet, a light router and the
losses (CE, guide, uniform, compute budget)."""
from .canet import CANet, Routing  # noqa: F401
from .config import CANetConfig  # noqa: F401
from .router import Router  # noqa: F401
from .supernet import Supernet  # noqa: F401
