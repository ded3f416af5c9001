"""Data: image sources and transforms (images), captions/VQA files (captions), the synthetic
shapes world (shapes, with shapes_scene, shapes_text, shapes_detect) and natural-image crops
(natural). Import the submodules directly; this package imports nothing, so `shapes` and
`captions` stay free of torch.
"""
