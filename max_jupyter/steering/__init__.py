"""Steering: vectors as values, the active mix, training from contrastive pairs, the vector
library (``VectorStore``) and other tools' files (``import_vector`` / ``export_vector``)."""
from max_jupyter.steering.controller import MixEntry, MixState, SteeringController
from max_jupyter.steering.interchange import export_vector, import_vector
from max_jupyter.steering.store import VectorInfo, VectorStore
from max_jupyter.steering.training import read_last_token_states, train_vector
from max_jupyter.steering.vector import ModelMismatchError, SteeringVector

__all__ = ["MixEntry", "MixState", "ModelMismatchError", "SteeringController", "SteeringVector",
           "VectorInfo", "VectorStore", "export_vector", "import_vector", "read_last_token_states",
           "train_vector"]
