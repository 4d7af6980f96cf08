"""The batch scoring flow: a thin call into :func:`vitpipe.score.score`, with a summary
artifact (rows, errors, img/s, the model version, the MLflow run)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from vitpipe.config import ScoreConfig

from . import links
from .stages import RESULTS, announce_where, library_logs


@flow(name="score", **RESULTS)
def score(config: ScoreConfig) -> dict[str, Any]:
    """Score a folder, an s3:// prefix or a shard set with a registered model -> Parquet."""
    from vitpipe.score import score as score_images

    with library_logs() as log:
        announce_where(log, "score")
        res = score_images(config)
    create_markdown_artifact(
        key="score-summary", description=f"scored {config.input}",
        markdown=(f"## Scored `{config.input}`\n\n- model: `{config.model}` (version "
                  f"{res['model_version'] or 'n/a'})\n- predictions: `{res['output']}`\n"
                  f"- rows: {res['rows']}, errors: {res['errors']}, {res['img_per_s']} img/s\n"
                  f"- input digest: `{res['input_digest']}`\n"
                  f"- MLflow run: {links.run_link(config.tracking, res['run_id'])}\n"))
    return res
