"""The ``wsm-optim demo`` command: WSM merges against decays and averaging baselines.

A subpackage of its own: the library core never imports it. ``model.py`` is
the nanoGPT-style model, ``data.py`` the corpus, ``config.py`` the presets and
the plan of every comparison, ``baselines.py`` WSD/EMA/schedule-free/cosine,
``training.py`` the single training pass, ``timing.py`` the time estimate said
before it, ``report.py`` the tables and verdicts, ``plots.py`` the figures,
``main.py`` the run.
"""

from .config import UsageError, add_arguments, build_config
from .main import run

__all__ = ["UsageError", "add_arguments", "build_config", "run"]
