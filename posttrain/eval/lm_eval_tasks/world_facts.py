"""Rows of the ``posttrain_world_facts`` lm-evaluation-harness task (``custom_dataset`` of its YAML next to this
file): :func:`posttrain.data.facts.world_multiple_choice` as a ``datasets.DatasetDict`` with one ``test`` split."""


def load(**kwargs):
    import datasets

    from posttrain.data.facts import world_multiple_choice

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(world_multiple_choice())})
