"""ddetr_tutorial: Deformable DETR (Zhu et al., ICLR 2021) built piece by piece.

Importing the package compiles nothing; the C++/CUDA kernels of
`ddetr_tutorial.ops` are built on first use.
"""

__version__ = "0.1.0"
