"""The CAM engine: tracing and target-layer choice, heads, the compiled step, methods. No files, no Ray."""
