"""The SFT family (docs/methods/sft.md): prompt / completion or conversational rows on TRL's ``SFTTrainer``.

``forward.py`` holds what an objective receives (:class:`~posttrain.families.sft.forward.SFTForward`) and the registry
of objectives; ``methods/`` one file per method (params, registration, pure objective); ``trainer.py`` the trainer,
which computes the forward-pass needs each method declares, and the family's builders."""
