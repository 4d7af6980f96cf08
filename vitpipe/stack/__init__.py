"""Local servers for laptops and integration tests: SeaweedFS S3, MLflow, Prefect.

``vitpipe stack up|down|status`` (:func:`stack_cli`) starts them all on 127.0.0.1.
"""

from __future__ import annotations


def stack_cli(action: str, stack_dir: str, **kwargs: object) -> int:
    """``vitpipe stack <action> --dir <stack_dir> [--docker]``; imported lazily (fast CLI)."""
    from .cli import stack_cli as _run

    return _run(action, stack_dir, **kwargs)  # type: ignore[arg-type]


__all__ = ["stack_cli"]
