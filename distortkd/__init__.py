"""distortkd: distortion-robust ViT representations by asymmetric multi-level distillation."""
__version__ = "0.1.0"
