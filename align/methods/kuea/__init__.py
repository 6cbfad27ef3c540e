"""KUEA: fine-tune CLIP's image tower toward a target kernel, anchored to its text tower."""
