"""Training: the resumable accelerate loop and its parts."""
