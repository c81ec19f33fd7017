"""The online-preference family (docs/methods/online_dpo.md): DPO on pairs the policy samples, ranked by rewards.

``trainer.py`` holds :class:`~posttrain.families.online.trainer.PosttrainOnlineDPOTrainer`, built on the RL family's
trainer (its sampling, rewards and reference), and the family's builders."""
