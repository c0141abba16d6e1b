"""shapeflow: raw meshes to a trained 3D shape generator."""

__version__ = "0.1.0"
