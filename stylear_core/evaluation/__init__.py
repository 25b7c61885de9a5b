"""Evaluation: DreamBench subject metrics (DINO, CLIP-I, CLIP-T) and their feature extractors."""
