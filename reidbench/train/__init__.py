"""The one training loop every defense reuses (:mod:`.loop`), its losses (:mod:`.losses`) and
augmentations (:mod:`.augment`).

Nothing is re-exported here: :mod:`reidbench.defense` builds its default loss on
:mod:`.losses`, and the loop takes a :class:`~reidbench.defense.Defense`, so a package ``__init__``
that imported the loop would close an import cycle. Import ``reidbench.train.loop`` for
``Recipe``, ``TrainResult`` and ``train_model``.
"""
