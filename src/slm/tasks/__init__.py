"""Tasks over whole documents, for any ``slm.model.LanguageModel`` (local, remote, routed): summaries and
translations of texts longer than the model's context, cut along the document's own structure.

    summary = slm.tasks.summarize(model, open("report.md").read(), words=100, max_tokens=128)
    french = slm.tasks.translate(model, text, "French", on_progress=lambda done, total: ...)
"""

from slm.tasks.split import split
from slm.tasks.summary import summarize
from slm.tasks.translation import translate

__all__ = ["split", "summarize", "translate"]
