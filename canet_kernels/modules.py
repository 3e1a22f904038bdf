"""The module layer of canet (op -> functional -> module): drop-in backbone
modules for sequential-recommendation code. See the README's "The modules".
"""
from .model.config import CANetConfig  # noqa: F401
from .model.encoder import (CANetEncoder, DenseEncoder, EncoderOutput,  # noqa: F401
                            RoutedEncoder, RoutedLayer, Routes)
