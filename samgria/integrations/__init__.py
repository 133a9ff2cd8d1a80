"""Optional integrations with training frameworks: PyTorch Lightning, Hugging Face, accelerate.

Each submodule imports its framework when it is imported, never before: ``import samgria`` needs
torch only, and ``pip install 'samgria[integrations]'`` installs the frameworks.

* :mod:`samgria.integrations.lightning`: :class:`~samgria.integrations.lightning.SAMCallback`
  (checks a ``Trainer``'s settings when ``fit`` starts and refuses those under which SAM would
  run a different algorithm) and :class:`~samgria.integrations.lightning.SAMMixedPrecision`
  (float16 mixed precision with a ``GradScaler`` under automatic optimization).
* :mod:`samgria.integrations.transformers`:
  :class:`~samgria.integrations.transformers.SAMTrainer`, a ``transformers.Trainer`` whose step
  runs both of SAM's passes over every accumulated micro-batch.
* :mod:`samgria.integrations.accelerate`:
  :class:`~samgria.integrations.accelerate.SAMAccelerator`, an ``accelerate.Accelerator`` whose
  prepared samgria optimizers have ``first_step`` / ``second_step`` and take ``step(closure)``
  under float16 mixed precision.

A submodule imports without its framework (so its documentation builds anywhere); constructing
one of its classes then raises ``ImportError`` naming what to install.
"""

__all__: list[str] = []
