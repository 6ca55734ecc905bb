"""PPD Chat's decoding engine: Parallel Prompt Decoding on stock transformers models."""

from .engine import Chunk, Counters, Engine, InputError, Session, Settings
from .models import LoadedModel, ModelError, load_model
from .prompt_tokens import PromptTokenError, PromptTokens
from .tree import TreeSpec, build_tree, default_tree

__all__ = ["Chunk", "Counters", "Engine", "InputError", "LoadedModel", "ModelError", "PromptTokenError",
           "PromptTokens", "Session", "Settings", "TreeSpec", "build_tree", "default_tree", "load_model"]
