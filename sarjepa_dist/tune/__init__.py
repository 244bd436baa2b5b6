"""Ray Tune sweeps over any config key, stopped early (ASHA) and ranked by the online few-shot probe.

``space`` (search axes → Tune samplers, checked before any trial), ``trial`` (the trial driver: a
TorchTrainer reporting through ``TuneReportCallback``), ``sweep`` (the Tuner, resume, retries) and
``results`` (ranked table, plot, best ``pretrain`` YAML). ``sarjepa pipeline`` chains a sweep with
a full pretraining and a few-shot report (``sarjepa_dist/pipeline.py``).
"""

from sarjepa_dist.tune.sweep import SweepResult, check_sweep, run_sweep

__all__ = ["SweepResult", "check_sweep", "run_sweep"]
