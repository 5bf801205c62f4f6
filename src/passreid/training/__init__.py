"""The training loop around every stage (:class:`~passreid.training.run.TrainingRun`), its
checkpoints and its schedules. The stages themselves are :mod:`passreid.finetune`,
:mod:`passreid.pretrain` and :mod:`passreid.cluster`."""
