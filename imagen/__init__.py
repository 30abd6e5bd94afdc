"""imagen: an Imagen-style cascaded text-to-image diffusion system."""

__version__ = "0.1.0"
