"""edgedi.models."""
