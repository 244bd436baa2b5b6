"""Few-shot evaluation: features once per encoder (Ray Data), K-shot protocols, reports.

``run_fewshot(cfg)`` is the job (``sarjepa fewshot``). Features: ``sources`` (what each column is
computed from), ``compute`` (the per-batch numbers), ``extract`` (Ray Data over the shards) and
``cache``. The feature sources and computation, and the protocol, classifier and interval math
(``splits``, ``classifiers``, ``protocol``, ``stats``) are plain numpy/torch and run without Ray.
"""
