"""Running a recipe: the pipeline (:mod:`posttrain.run.pipeline`), multi-stage recipes (:mod:`posttrain.run.stages`),
the model card (:mod:`posttrain.run.card`) and the report page (:mod:`posttrain.run.report`)."""
