"""Names and parameters of the feed-forward blocks of fairseq speech-to-text models."""
from __future__ import annotations

import torch


def ffn_blocks(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """FFN block name -> its parameters, in model order.

    Transformer layers (fairseq's TransformerEncoderLayer / TransformerDecoderLayer) hold the FFN
    as ``fc1``/``fc2``: the block is named ``<layer>.ffn``. Conformer layers hold two macaron
    FFNs ``ffn1``/``ffn2`` (FeedForwardModule with ``w_1``/``w_2``): named as they are.
    A model may also expose ``gdps_ffn_blocks()`` (the split models do) to name its own blocks.
    """
    if hasattr(model, "gdps_ffn_blocks"):
        return model.gdps_ffn_blocks()
    blocks: dict[str, list[torch.nn.Parameter]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "fc1") and hasattr(module, "fc2") and isinstance(module.fc1, torch.nn.Linear):
            blocks[f"{name}.ffn"] = [*module.fc1.parameters(), *module.fc2.parameters()]
        elif hasattr(module, "w_1") and hasattr(module, "w_2") and name.rsplit(".", 1)[-1].startswith("ffn"):
            blocks[name] = [*module.w_1.parameters(), *module.w_2.parameters()]
    return blocks
