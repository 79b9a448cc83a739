"""``python -m region_medclip.benchmark``: the field's evaluation protocols on a trained model,
laid out as the published tables beside the published numbers (``suites``, ``tables``,
``published``)."""
