"""Perplexity of causal language models on held-out text."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .pipeline.calibrate import check_token_ids
from .pipeline.data import load_text, tokenize
from .utils import is_int, module_device, progress


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, text: Optional[str] = None,
               dataset: Optional[str] = None, seqlen: int = 2048, max_windows: Optional[int] = None,
               show_progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``seqlen`` tokens.

    The text is the evaluation split of ``dataset`` (the offline corpus by default, held out
    from calibration) or the given ``text``. The final partial window is dropped; at most
    ``max_windows`` windows are evaluated (all when None). Runs on the model's device.

    Raises:
        ValueError: ``seqlen`` < 2 (a window must predict at least one token), ``max_windows``
            < 1, a text shorter than one window, or token ids outside the model's vocabulary.
    """
    if not is_int(seqlen) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (a window predicts seqlen - 1 tokens), "
                         f"got {seqlen!r}")
    if max_windows is not None and (not is_int(max_windows) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    ids = tokenize(tokenizer, load_text(text, dataset, "evaluation"))
    check_token_ids(model, ids, "the tokenized evaluation text")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of seqlen={seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = module_device(model)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for w in progress(range(n_windows), desc="perplexity", enabled=show_progress, unit="window"):
        window = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += seqlen - 1
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
