"""Pretraining of the towers the embedded world swaps: a self-supervised tiny DINOv2 (:mod:`.dino`) and the
caption-trained tiny CLIP (:mod:`.clip`), each a ``Method`` of the shared loop, learning from a shapes
world's train split (:mod:`.world`) and written as ordinary HF directories."""
