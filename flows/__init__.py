"""Prefect flows for vitpipe: one thin flow per stage plus the ``pipeline`` flow that chains them.

The library (``vitpipe``) imports no Prefect; everything Prefect-specific lives here.
"""
