"""Ray Train (V2) pretraining: ``runner.run_pretrain`` drives ``entry.train_loop_per_worker`` (then ``loop``) on a
cluster reached through ``sarjepa_dist.cluster.ray_init``; ``metrics`` holds the telemetry and
``export`` turns a checkpoint into a timm-loadable encoder. Imports are per module (Ray loads lazily)."""
