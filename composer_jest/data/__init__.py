"""Data: built-in demo sets (and, later, MDS conversion and streaming)."""

from composer_jest.data.shapes import ShapesDataset, shape_classnames, shapes_dataloader

__all__ = ['ShapesDataset', 'shape_classnames', 'shapes_dataloader']
