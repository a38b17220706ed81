"""lm-evaluation-harness integration: the registered model ``gape`` (an HFLM subclass, in
``gape.tasks.lmeval.model``) and offline tasks (``gape_passkey``, ``gape_niah_single``) shipped in
``tasks/``. ``gape eval ...`` runs lm-eval's own command line with both in place."""

from __future__ import annotations

from importlib import resources

TASKS_DIR = str(resources.files("gape.tasks.lmeval").joinpath("tasks"))


def register() -> None:
    """Register the ``gape`` model with lm-eval (importing the module does it)."""
    from . import model  # noqa: F401


def task_manager(include_path=None, **kwargs):
    """An lm-eval ``TaskManager`` that also knows the gape tasks (for ``simple_evaluate``)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    return TaskManager(include_path=[TASKS_DIR, *extra], **kwargs)
