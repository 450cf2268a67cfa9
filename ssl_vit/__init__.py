"""ssl_vit: pretrain Vision Transformers (supervised, DeiT distillation, MAE) and compare how."""

__version__ = "0.1.0"
