"""PCM-Net: zero-shot image captioning trained on synthetic images (the work of each stage)."""

__version__ = "0.1.0"
