"""WSM inside the trainers users already run.

* :mod:`wsm_optim.integrations.lightning`: ``WSMCallback`` for Lightning's ``Trainer(callbacks=[...])``.
* :mod:`wsm_optim.integrations.transformers`: ``wrap_trainer`` for a Hugging Face ``Trainer``.
* :mod:`wsm_optim.integrations.torchtitan`: ``with_wsm`` for a torchtitan optimizer config
  (``pip install "wsm-optim[torchtitan]"``).
* :mod:`wsm_optim.integrations.olmo_core`: ``WSMMergeCallback`` for an OLMo-core ``Trainer``
  (``pip install "wsm-optim[olmo-core]"``).
* :mod:`wsm_optim.integrations.deepspeed`: ``attach(engine)`` for ``deepspeed.initialize(optimizer=WSMOptimizer(...))``
  (ZeRO stage 0, 1, 2), readouts by parameter name.

This package imports nothing on its own: each submodule imports its framework
when it is imported (Lightning) or used (transformers; the DeepSpeed module
only duck-types the engine), so ``import wsm_optim`` never needs them. Install them with ``pip install "wsm-optim[integrations]"``.
"""

__all__: list[str] = []
