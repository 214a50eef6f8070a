"""Data: built-in demo sets (and, later, MDS conversion and streaming)."""

from composer_jest.data.shapes import ShapesDataset, shape_classnames

__all__ = ['ShapesDataset', 'shape_classnames']
