"""The unlearning family (docs/unlearning.md): forget and retain sets on ``transformers.Trainer``.

An objective is a forget term plus a retain term, ``gamma * L_forget + alpha * L_retain``: ``objective.py`` holds the
three registries and the combiner, ``terms/`` one file per term, ``methods/`` one file per method page (params,
registration of the method and of its objective), ``trainer.py`` the trainer and builders, ``wagle.py`` /
``wagle_mask.py`` the WAGLE weight mask any method can take (docs/methods/wagle.md)."""
