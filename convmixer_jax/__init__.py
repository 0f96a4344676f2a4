"""ConvMixer in JAX/Flax: models, training, evaluation and pretrained weights.

The public API (`create_model`, `list_models`, `count_params`, `ConvMixer`) is imported on
first use, so that loading a config (`convmixer_jax.train.config`) pulls in no JAX.
"""

import importlib

_API = {
    "ConvMixer": "convmixer_jax.model.convmixer",
    "count_params": "convmixer_jax.model.flops",
    "create_model": "convmixer_jax.model.registry",
    "list_models": "convmixer_jax.model.registry",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'convmixer_jax' has no attribute {name!r}")
