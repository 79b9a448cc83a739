"""Flax linen towers: ViT image tower, CLIP/BERT text towers, the region tower and the composite."""
