"""jaxtune: fine-tune pretrained Hugging Face transformers with JAX, Flax NNX and Optax (docs/architecture.md)."""
