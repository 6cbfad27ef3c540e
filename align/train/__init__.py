"""Training: the one resumable accelerate loop every method runs on, and its parts.

* ``loop``: ``train(method, cfg, out_dir)``, the loop itself;
* ``method``: the ``Method`` protocol a method implements and the ``TrainResult`` a run returns;
* ``config``: ``TrainConfig``, the ``train:`` section of every recipe;
* ``accelerator``: the run's ``Accelerator``, DeepSpeed ``auto`` values, ``unwrap``;
* ``optim``: parameter groups, optimizers and learning-rate schedules;
* ``batches``: the data order (a function of seed and epoch) and the batch stream across epochs;
* ``checkpoints``: ``checkpoints/step-<N>`` saved atomically, listed, pruned, set aside;
* ``resume``: where a run starts and which settings a resume keeps;
* ``guard``: the loss guard (NaN/inf and exploding losses) and how a bad run stops;
* ``logs``: the log window, ``metrics.jsonl``, tracker hyperparameters, ``loss.png``.

Nothing is re-exported here: import from the module (or the public names from :mod:`align`).
"""
