"""slim_ray: SLIM (step-by-step knowledge distillation for sequential recommendation) on Ray.

Stages (one folder each) talk only through Parquet contracts, see ``slim_ray.data.schemas``:

    prepare -> teach -> distill -> reason -> encode -> train -> evaluate -> report / serve
"""

__version__ = "0.1.0"
