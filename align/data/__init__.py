"""Data: the shapes world, readers for image-text sources, and the embedding cache."""

from align.data.readers import open_data
from align.data.records import DataSource, ImageTextDataset, Sample
from align.data.shapes import generate_shapes, load_shapes, shapes_classes

__all__ = [
    "DataSource",
    "ImageTextDataset",
    "Sample",
    "generate_shapes",
    "load_shapes",
    "open_data",
    "shapes_classes",
]
