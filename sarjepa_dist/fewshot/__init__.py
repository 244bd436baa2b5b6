"""Few-shot evaluation: features once per encoder (Ray Data), K-shot protocols, reports.

``run_fewshot(cfg)`` is the job (``sarjepa fewshot``); the protocol, classifier and interval math
(``splits``, ``classifiers``, ``protocol``, ``stats``) is plain numpy/torch and runs without Ray.
"""
