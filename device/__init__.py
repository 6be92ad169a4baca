"""ctpi device side: what runs on the Raspberry Pi (no TensorFlow, no Keras)."""

__version__ = "0.1.0"
