"""KUEA: fine-tune CLIP's image tower toward a target kernel, anchored to its text tower.

``recipe``: the recipe (config) and the ``Method``; ``data``: student, target and training images;
``report``: the compatibility report and the evaluation record; ``export``: every output on disk.
"""
