"""ddetr_tutorial: Deformable DETR (Zhu et al., ICLR 2021) built piece by piece.

Importing the package compiles nothing; the C++/CUDA kernels of
`ddetr_tutorial.ops` are built on first use.

Shape letters, the same in every docstring and comment:
  N   batch (images)
  Q   object queries of the decoder (`num_queries`)
  Lq  queries of one attention call (S in the encoder, Q in the decoder)
  S   flattened tokens of all levels, sum over l of H_l * W_l
  L   feature levels; H_l, W_l the height and width of level l's map
  M   attention heads
  K   sampling points per head per level
  C   model width (`d_model`, the config's `hidden_dim`)
  D   width of one head, C / M
  T   ground-truth objects of one image (T_i for image i)
  H, W   a padded image or map; h, w an unpadded image, in pixels
Counts of decoder layers are written out ("layers"), not lettered.
Boxes say their format in their name: `boxes_cxcywh`, `boxes_xyxy`.
"""

__version__ = "0.1.0"
