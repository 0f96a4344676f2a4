"""ConvMixer in JAX/Flax: models, training, evaluation and pretrained weights."""

from convmixer_jax.models import ConvMixer, count_params, list_models
from convmixer_jax.pretrained import create_model

__all__ = ["ConvMixer", "count_params", "create_model", "list_models"]
