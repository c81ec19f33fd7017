"""posttrain: post-training for LLMs from one recipe YAML."""

__version__ = "0.1.0"
