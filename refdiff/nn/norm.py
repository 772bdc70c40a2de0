"""Normalisation ops as forward/backward pairs (reference). To be written."""
__all__ = []
