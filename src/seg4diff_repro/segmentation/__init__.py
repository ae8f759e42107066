"""Semantic segmentation from attention maps, and its scores."""
