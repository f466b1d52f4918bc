"""What a model is to the rest of slm: one contract (``LanguageModel``), the prompt policy, and the local
``Model`` that runs the generation loop over an engine. Remote models and routes (``slm.remote``)
satisfy the same contract."""

from slm.model.contract import LanguageModel, Messages
from slm.model.local import Choices, Model
from slm.model.prompt import Prompt, ask

__all__ = ["Choices", "LanguageModel", "Messages", "Model", "Prompt", "ask"]
