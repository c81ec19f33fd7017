#!/bin/sh
# `docker run IMAGE train RECIPE` (or any other posttrain subcommand) runs posttrain; any other command runs as given,
# e.g. `docker run IMAGE accelerate launch --config_file configs/deepspeed_zero3.yaml -m posttrain.cli train RECIPE`,
# `docker run IMAGE trl vllm-serve --model MODEL`, or `docker run -it IMAGE bash`.
set -e
case "$1" in
  ""|-*|train|eval|methods|tasks|init-model|merge|report|poft-score) exec posttrain "$@" ;;
  *) exec "$@" ;;
esac
