"""imagegpt: ImageGPT (Chen et al., "Generative Pretraining from Pixels", 2020) in PyTorch."""

from .config import PRESETS, ImageGPTConfig
from .errors import ImageGPTError
from .model import ImageGPT, ImageGPTClassifier
from .palette import Palette
from .processor import ImageProcessor

__all__ = [
    "PRESETS",
    "ImageGPT",
    "ImageGPTClassifier",
    "ImageGPTConfig",
    "ImageGPTError",
    "ImageProcessor",
    "Palette",
]
__version__ = "0.1.0"
