"""A cross-process lock around moving the ``champion`` alias, built on the registry itself.

MLflow aliases have no compare-and-set, so two registrations that read the same champion could
both decide to promote and the worse one could win the last write. Creating a registered model
is atomic in the registry's database (unique name), so ``<name>.gate-lock`` serves as a mutex:
whoever creates it holds the lock, deleting it releases it (registered models are hard-deleted).
A holder that crashed leaves a lock that expires after ``ttl`` seconds and is then taken over.

What remains of the race window (documented in README "Promotion gate"):
- only writers that go through vitpipe take the lock: someone moving the alias by hand in the UI
  or with another client is not serialised (the gate's re-check right before the move narrows
  that to the time between two HTTP calls);
- taking over an expired lock is delete-then-create: two processes doing so at the same instant
  could both believe they hold it. This needs a crashed holder plus two simultaneous takeovers;
  the re-check still applies;
- expiry uses each client's wall clock, so clocks skewed by more than ``ttl`` break it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..errors import TrackingError
from .client import is_already_exists, is_not_found

LOCK_SUFFIX = ".gate-lock"
_OWNER, _EXPIRES = "vitpipe.lock.owner", "vitpipe.lock.expires"


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def gate_lock(client: MlflowClient, model_name: str, *, ttl: float = 60.0,
              timeout: float = 60.0) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` for the block; yields the owner id."""
    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                name, tags={_OWNER: owner, _EXPIRES: f"{time.time() + ttl:.3f}"},
                description="Transient lock held by vitpipe while it moves the champion alias "
                            f"of '{model_name}'. Safe to delete once past its expiry tag.")
            break
        except MlflowException as err:
            if not is_already_exists(err):
                raise TrackingError(
                    f"cannot take the promotion lock {name}: {err.message}") from err
        _take_over_if_expired(client, name)
        if time.monotonic() > deadline:
            raise TrackingError(
                f"promotion lock '{name}' still held after {timeout:g}s by {_holder(client, name)};"
                f" if that registration crashed, the lock expires {ttl:g}s after it was taken, "
                f"or delete registered model '{name}'.")
        time.sleep(random.uniform(0.05, 0.25))
    try:
        yield owner
    finally:
        _release(client, name, owner)


def _holder(client: MlflowClient, name: str) -> str:
    try:
        return client.get_registered_model(name).tags.get(_OWNER, "unknown")
    except MlflowException:
        return "unknown (released meanwhile)"


def _take_over_if_expired(client: MlflowClient, name: str) -> None:
    try:
        tags = client.get_registered_model(name).tags
        expired = float(tags.get(_EXPIRES, "0")) < time.time()
    except MlflowException as err:
        if is_not_found(err):
            return  # released between our create and this read: just retry
        raise
    except ValueError:
        expired = True  # an unreadable expiry tag: treat as stale
    if expired:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(name)


def _release(client: MlflowClient, name: str, owner: str) -> None:
    """Delete the lock only if we still own it (it may have expired and been taken over)."""
    try:
        if client.get_registered_model(name).tags.get(_OWNER) == owner:
            client.delete_registered_model(name)
    except MlflowException as err:
        if not is_not_found(err):
            raise TrackingError(f"cannot release promotion lock '{name}': {err.message}") from err
