"""Model backends: aigc's native GPT-2, the transformers adapter, quantisation, weights, checkpoints, the built-in tiny models, and loading them."""
