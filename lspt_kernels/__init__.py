"""lspt-kernels: Long-term Spatial Prompt Tuning for timm Vision Transformers, with fused kernels."""
from .ops import lspt_step

__all__ = ["lspt_step"]
__version__ = "0.1.0"
