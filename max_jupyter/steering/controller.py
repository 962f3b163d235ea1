"""Deprecated: the mix moved to ``max_jupyter.steering.mix`` and ``SteeringController`` is
now ``Mix``. Importing this module warns; its names stay importable for old code."""
from max_jupyter.errors import warn_deprecated
from max_jupyter.steering.mix import EntryChange, Mix, MixEntry, MixState

warn_deprecated("max_jupyter.steering.controller.SteeringController",
                "max_jupyter.steering.mix.Mix", 2)

SteeringController = Mix

__all__ = ["EntryChange", "Mix", "MixEntry", "MixState", "SteeringController"]
