"""Sample quality: the Frechet distance and its feature extractors, and evaluation in training or from checkpoints."""
