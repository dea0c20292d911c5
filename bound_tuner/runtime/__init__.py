"""Where trials run: device choice, float32 precision and seeds."""
