"""region-medclip: region-aware contrastive image-text pretraining for medical images."""

__version__ = "0.1.0"
