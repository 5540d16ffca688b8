"""Pure tensor functions behind the geometry, the losses and the certificates (docs/MATH.md)."""
