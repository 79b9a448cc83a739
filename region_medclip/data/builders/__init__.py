"""TFDS builders (array_record files; building needs no TensorFlow). ``BUILDERS`` maps names to
builder classes; importing a builder module registers it with TFDS."""
