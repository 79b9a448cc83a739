"""Evaluation metrics and evaluators (zero-shot, retrieval, regions, grounding, modality gap)."""
