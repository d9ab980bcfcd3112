"""Generation with a KV cache: decoder-only (greedy, top-p sampling) and encoder-decoder (also beam search)."""
