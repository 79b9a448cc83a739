"""Importers of pretrained checkpoints read from local files (no download at run time)."""
