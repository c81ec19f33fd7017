"""The unpaired-preference family (docs/methods/kto.md): completions labelled desirable or undesirable, on TRL's
``KTOTrainer``. ``methods/`` holds one file per method (params and registration), ``trainer.py`` the trainer and
builders; the loss is the pure :func:`posttrain.losses.preference.kto_loss`."""
