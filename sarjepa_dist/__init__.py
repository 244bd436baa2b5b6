"""sarjepa-dist: gradient-domain JEPA pretraining of SAR encoders on Ray, with few-shot evaluation."""

__version__ = "0.1.0"
