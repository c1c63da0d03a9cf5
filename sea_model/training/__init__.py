"""The two-stage trainer: a plain PyTorch loop, single process or ``torchrun`` (DDP; FSDP2 optional).

* :mod:`.loop`: :func:`~sea_model.training.loop.train`, one stage from configuration to final checkpoint.
* :mod:`.step`: one optimizer step (the trainer's and the Stage-1 benchmark's).
* :mod:`.run_config`: a run's configuration from defaults, a checkpoint, a YAML file and the command line.
* :mod:`.distributed`, :mod:`.sampler`, :mod:`.guards`: processes and devices, the data stream,
  what stops or skips a step (preemption, non-finite steps).
* :mod:`.checkpoint`, :mod:`.run_dir`, :mod:`.metrics`: what a run writes.
"""
