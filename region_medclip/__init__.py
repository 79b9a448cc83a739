"""region-medclip: region-aware contrastive image-text pretraining for medical images."""

__version__ = "0.1.0"


def load(path: str, step: int | None = None, params: str = "params"):
    """A trained model from a workdir: ``encode_image``, ``encode_text``, ``zero_shot``,
    ``ground`` (see :mod:`region_medclip.api`); ``params="ema"`` takes the moving average of
    the params that a run with ``config.train.ema_decay > 0`` keeps."""
    from region_medclip import api

    return api.load(path, step, params=params)
