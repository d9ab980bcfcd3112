"""Foreign weights in and out: HF safetensors and llama.cpp GGUF checkpoints read into our params, HF and PEFT exports."""
