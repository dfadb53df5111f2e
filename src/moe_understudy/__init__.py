"""moe-understudy: understudies for MoE layers and MoE-aware distillation."""

__version__ = "0.1.0"
