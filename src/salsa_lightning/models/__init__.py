"""Model loading (one place for every stage), the embedded default model, tiny test models."""
