"""Stage 2 of the pipeline: a registry encoder, a projector and a Hugging Face causal LM."""
