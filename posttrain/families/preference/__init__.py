"""The preference family (docs/preference.md): paired chosen / rejected completions on TRL's ``DPOTrainer``.

``trainer.py`` holds :class:`~posttrain.families.preference.trainer.PosttrainPreferenceTrainer`, which computes the
forward-pass needs each method declares and calls its pure objective."""
