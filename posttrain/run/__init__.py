"""Running a recipe: the pipeline (:mod:`posttrain.run.pipeline`, one named call per phase), the checks that need no
model (:mod:`posttrain.run.preflight`), the run's models (:mod:`posttrain.run.models`), what a run writes
(:mod:`posttrain.run.outputs`), multi-stage recipes (:mod:`posttrain.run.stages`), the report page
(:mod:`posttrain.run.report`) and the rebuild of the built-in models (:mod:`posttrain.run.build_builtins`). The model
card (:mod:`posttrain.card`) sits below the trainers, which write it at every checkpoint save."""
