"""Builds the one compiled piece: the exact 1-D k-means dynamic program (plain C).

It needs the Python headers only, no torch headers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lightning_palettize._kmeans1d",
            sources=["lightning_palettize/_kmeans1d.c"],
            extra_compile_args=["-O3"],
        )
    ]
)
