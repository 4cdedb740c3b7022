"""Applications over the engine: poems and poetics, recommendations, fine-tuning, prompt templates."""
