"""TFDS builders (array_record files; building needs no TensorFlow).

``builder_class(name)`` looks a builder up in one registry: ``synth_cxr`` (generated) and the
real datasets of ``real.BUILDERS`` (read from a manual download directory).
"""


def builder_class(name: str):
    """The builder class registered under ``name``.

    Raises:
      KeyError: naming the known builders.
    """
    from region_medclip.data.builders import real, synth_cxr

    registry = {"synth_cxr": synth_cxr.SynthCxr, **real.BUILDERS}
    if name not in registry:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(registry)}")
    return registry[name]
