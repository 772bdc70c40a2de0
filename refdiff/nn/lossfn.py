"""Loss ops (log-softmax cross-entropy, binary cross-entropy) as forward/backward pairs. To be written."""
__all__ = []
