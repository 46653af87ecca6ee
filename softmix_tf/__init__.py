"""SoftMix for TensorFlow (placeholder, being built)."""
