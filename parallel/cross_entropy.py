"""Cross-entropy over (possibly vocab-sharded) logits. (Vocab-parallel path: issue 6.)"""

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss in fp32.   logits: (tokens, vocab_local), labels: (tokens,) -> (tokens,).

    With a tensor-parallel `group` the logits are this rank's vocabulary shard and the full
    logits are never gathered."""
    if group is not None:
        raise NotImplementedError("vocab-parallel cross-entropy lands with the parallel runtime (issue 6)")
    return F.cross_entropy(logits.float(), labels, reduction="none")
