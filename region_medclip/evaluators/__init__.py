"""Evaluation metrics and evaluators (zero-shot, retrieval, regions, grounding, modality gap).

``registry.KINDS`` maps each ``config.evals.<name>.kind`` to its evaluator (``run`` and ``plot``
of the kind's module); ``run.evaluate`` embeds each split once and dispatches through it. The
evaluators read datasets only through the dataset registry (``region_medclip.data.registry``).
"""
