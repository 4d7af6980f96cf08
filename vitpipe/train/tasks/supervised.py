"""Supervised training from scratch: cross-entropy on labels (with MixUp/CutMix when set).

Everything is :class:`~.base.Task`'s default; a pipeline can run it as its ``pretrain`` stage
(``pretrain.mode: supervised``), whose classifier then starts the ``finetune`` stage.
"""

from __future__ import annotations

from .base import Task


class Supervised(Task):
    name = "supervised"
