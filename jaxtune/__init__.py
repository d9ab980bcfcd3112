"""jaxtune: fine-tune pretrained Hugging Face transformers with JAX, Flax NNX and Optax (docs/architecture.md).

From Python: jaxtune.finetune, jaxtune.evaluate and jaxtune.load (jaxtune/api.py, imported on first use so that
`import jaxtune` stays light); from a shell: the `jaxtune` command (jaxtune/commands).
"""

API = ("finetune", "evaluate", "load", "make_config", "RunResult", "Loaded")
__all__ = list(API)


def __getattr__(name: str):
  if name in API:
    from jaxtune import api

    return getattr(api, name)
  raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
