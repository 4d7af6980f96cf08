"""vitpipe: train Vision Transformers end to end.

A plain library (no Prefect import): ``models`` (pure nn.Modules), ``data`` (shards and
loaders), ``train`` (the Accelerate engine), ``evaluate``, ``registry`` (MLflow), ``config``
(typed stage configs) and ``cli``. Prefect lives in the top-level ``flows`` package.
"""

__version__ = "0.1.0"
