"""Steering: vectors as values, the live mix (``Mix``), training from contrastive pairs, the
vector library (``VectorStore``) and other tools' files (``import_vector`` /
``export_vector``)."""
from max_jupyter.steering.interchange import export_vector, import_vector
from max_jupyter.steering.mix import Mix, MixEntry, MixState
from max_jupyter.steering.store import VectorInfo, VectorStore
from max_jupyter.steering.training import read_last_token_states, train_vector
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector

__all__ = ["Mix", "MixEntry", "MixState", "ModelMismatchError", "SteeringVector",
           "VectorInfo", "VectorStore", "export_vector", "import_vector", "read_last_token_states",
           "train_vector"]


def __getattr__(name: str):
    if name == "SteeringController":  # the old name of Mix, kept for old code
        from max_jupyter.errors import warn_deprecated

        warn_deprecated("max_jupyter.steering.SteeringController", "max_jupyter.steering.Mix", 2)
        return Mix
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
