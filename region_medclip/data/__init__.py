"""Data: the record schema, the synthetic chest X-ray set, raw readers, TFDS builders, pipeline."""
