"""Saving and loading: checkpoints (``checkpoint``: pyengine.save / pyengine.load), the checks
both load paths run before reading a weight (``checks``), and the transformers integration
(``hf``: AutoModelForCausalLM.from_pretrained on a pyengine checkpoint)."""
