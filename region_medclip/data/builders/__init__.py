"""TFDS builders (array_record files; building needs no TensorFlow).

``synth_cxr`` is generated (its builder is ``data/synth/builder.py``); the real datasets of
``real.BUILDERS`` are read from a manual download directory; ``common`` holds the features and
the example writer they share. Which builder a dataset name uses is its entry in
``data/registry.py``.
"""


def builder_class(name: str):
    """The builder class of dataset ``name`` (its registry entry's).

    Raises:
      KeyError: naming the known datasets.
    """
    from region_medclip.data import registry

    return registry.get(name).builder()
