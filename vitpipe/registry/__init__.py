"""MLflow model registry: the raw-image pyfunc, registration, the promotion gate, predict.

``register(cfg)`` is the stage entry point; ``rollback(name)`` moves ``champion`` back one step;
``load_model(uri)`` / ``predict_cli`` are the consumers' side.
"""

from .register import CHALLENGER, CHAMPION, promote, register, rollback

__all__ = ["CHALLENGER", "CHAMPION", "promote", "register", "rollback"]
