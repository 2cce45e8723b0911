"""Model-file surgery: edits written into checkpoints (a model folder, one single-file checkpoint, the weights
in place) and exported as LoRA / UNet state dicts for other tools. The edit values themselves live in
``edits/``."""
