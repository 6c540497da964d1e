"""Builds the compiled pieces (plain C, Python headers only, no torch headers):

* ``_kmeans1d``: the exact 1-D k-means dynamic program.
* ``_kmeansvec``: vector k-means (k-means++ seeding, Lloyd with Hamerly's bounds).
* ``_dkm_cpu``: DKM's fused CPU passes (soft_kmeans' scalar engine; AVX2/F16C where the CPU
  has them, chosen at run time, portable C otherwise). Optional at import: without it the
  engine runs its torch code.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lightning_palettize._kmeans1d",
            sources=["lightning_palettize/_kmeans1d.c"],
            extra_compile_args=["-O3"],
        ),
        Extension(
            "lightning_palettize._kmeansvec",
            sources=["lightning_palettize/_kmeansvec.c"],
            extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp-simd"],
        ),
        Extension(
            "lightning_palettize._dkm_cpu",
            sources=["lightning_palettize/_dkm_cpu.c"],
            # no-trapping-math: lets the compiler if-convert the float selects of the tile
            # loops; openmp-simd: only the `omp simd` loop pragmas, no OpenMP runtime
            extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp-simd"],
        ),
    ]
)
