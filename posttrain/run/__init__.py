"""Running a recipe: the pipeline (:mod:`posttrain.run.pipeline`, one named call per phase), the checks that need no
model (:mod:`posttrain.run.preflight`), the run's models (:mod:`posttrain.run.models`), what a run writes
(:mod:`posttrain.run.outputs`), multi-stage recipes (:mod:`posttrain.run.stages`), the model card
(:mod:`posttrain.run.card`) and the report page (:mod:`posttrain.run.report`)."""
