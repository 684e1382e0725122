"""Build configuration beyond pyproject.toml: the optional C extension `scsuperweight.instrument._reduce`.

It speeds up `Trace`'s per-activation reductions (one pass over the values instead of five). It is optional: where
no C compiler is available the build goes on without it and `Trace` uses its torch path, which gives the same
answers (tests/test_instrument.py checks both).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "scsuperweight.instrument._reduce",
            sources=["scsuperweight/instrument/_reduce.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
