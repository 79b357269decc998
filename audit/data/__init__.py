"""Everything that touches files: dataset formats and readers, decoding, the output store, schemas."""
