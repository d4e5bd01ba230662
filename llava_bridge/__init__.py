"""Stage 2: a registry vision encoder, a projector and a causal LM, trained with DeepSpeed (LLaVA-style)."""
# dtpclip first: while `python -m llava_bridge.<command>` imports this package, dtpclip defers its heavy
# imports (see dtpclip/__init__), so the command parses its arguments, and answers --help, at once.
import dtpclip  # noqa: F401
