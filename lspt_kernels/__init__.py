"""lspt-kernels: Long-term Spatial Prompt Tuning for timm Vision Transformers, with fused kernels."""
from .checkpoints import load_backbone_checkpoint
from .encoders import AdapterEncoder, GaPTEncoder, LinearProbe, LSPTEncoder, PromptEncoder, VPTEncoder, from_timm
from .multitask import MultiTaskEncoder
from .ops import lspt_step
from .spt_init import init_prompts_from_data

__all__ = ["LSPTEncoder", "GaPTEncoder", "VPTEncoder", "AdapterEncoder", "LinearProbe", "PromptEncoder", "from_timm",
           "MultiTaskEncoder", "load_backbone_checkpoint", "lspt_step", "init_prompts_from_data"]
__version__ = "0.1.0"
