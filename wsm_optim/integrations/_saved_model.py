"""Load a folder written by ``Trainer.save_model`` (a ``merged/`` folder) into the trainer's model, completely.

``save_pretrained`` leaves tied weights out of the file (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``); ``Trainer._load_best_model``
then loads with ``strict=False`` and logs "There were missing keys in the
checkpoint model loaded: ['lm_head.weight']" although nothing is missing. This
loader accepts exactly the keys that are the same tensor as a loaded one, and
refuses any other missing or unexpected key instead of logging it.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_saved_model"]


def load_saved_model(trainer: Any, folder: str) -> bool:
    """Load ``folder`` into ``trainer.model``; ``False`` (nothing done) where the ``Trainer``'s own loader must run.

    Handles a plain model (no DeepSpeed, FSDP, PEFT or SageMaker MP) saved as
    one safetensors file or as safetensors shards with their index.

    Raises:
        RuntimeError: the folder lacks weights that are not tied to loaded
            ones, or holds weights the model does not have; names them.
    """
    import safetensors.torch
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_sagemaker_mp_enabled

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or is_sagemaker_mp_enabled():
        return False
    if hasattr(trainer.model, "peft_config"):  # adapters: the Trainer's loader knows their files
        return False
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        import json

        with open(index) as f:
            files = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        return False
    model = trainer.model
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in files:  # one shard in memory at a time
        result = model.load_state_dict(safetensors.torch.load_file(file, device="cpu"), strict=False)
        unexpected += result.unexpected_keys
        with safetensors.safe_open(file, framework="pt") as f:
            loaded.update(f.keys())
    entries = model.state_dict(keep_vars=True)
    loaded_tensors = {id(entries[k]) for k in loaded if k in entries}
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())  # the model re-creates these
    missing = [k for k, v in entries.items() if k not in loaded and id(v) not in loaded_tensors and k not in ignored]
    if missing or unexpected:
        raise RuntimeError(
            f"{folder} does not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (tied weights, such as "
            "lm_head.weight tied to the input embedding, are not missing)"
        )
    return True
