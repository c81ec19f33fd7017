"""The reward-model family (docs/methods/reward.md): a sequence-classification head trained on preference pairs, on
TRL's ``RewardTrainer``. ``methods/`` holds one file per method (params and registration), ``trainer.py`` the trainer,
builders and pairwise scoring; the loss is the pure :func:`posttrain.losses.reward.bradley_terry_loss`."""
