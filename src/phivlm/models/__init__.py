"""Model parts: frozen vision tower, projector registry, language model loading, the multimodal model."""
