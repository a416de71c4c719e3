"""Representation-intervention baselines built as LoFiT adapters (computed offsets, nothing trained).

- **ITI** (Li et al., 2023): per-head linear probes on head activations at the last token of question + answer,
  heads ranked by validation probe accuracy; each selected head gets the offset
  ``v_h = alpha * sigma_h * theta_h``, where ``theta_h`` is the mass-mean-shift direction (mean of true-answer
  activations minus mean of false-answer ones, unit length) and ``sigma_h`` the standard deviation of the
  activations projected on ``theta_h``.
- **RepE-style reading vectors**: per layer, the first principal component ``r_l`` of the differences between the
  residual stream after true and after false answers, added as ``c * r_l`` to that layer's attention output. The
  attention output is ``W z (+ b)``, so adding ``c * r_l`` is exactly a LoFiT offset on all heads of the layer with
  ``W v = c * r_l``, i.e. ``v = pinv(W) c r_l`` (merged, it becomes the output projection's bias ``c * r_l``).

Both return a ``PeftModel`` with an ordinary LoFiT adapter, so they save, load, merge and benchmark like LoFiT.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .training.heads import HeadSelection
from .tuner.config import LoFiTConfig
from .tuner.layer import LoFiTLayer
from .tuner.model import find_projections


# --------------------------------------------------------------------------------------------------- activations
def _last_token_batches(tokenizer, texts: list[str], batch_size: int):
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            yield batch, batch["attention_mask"].sum(1) - 1  # index of each row's last real token
    finally:
        tokenizer.padding_side = padding_side


def collect_head_activations(model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Inputs of every layer's attention output projection at each text's last token: ``(N, L, H, d)``."""
    projections = find_projections(model, LoFiTConfig())
    layers = sorted(projections)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = model.get_submodule(projections[layer][0])
        handles.append(
            module.register_forward_pre_hook(lambda m, args, layer=layer: captured.__setitem__(layer, args[0]))
        )
    rows = []
    try:
        for batch, last in tqdm(
            _last_token_batches(tokenizer, texts, batch_size), desc="activations", total=-(-len(texts) // batch_size)
        ):
            with torch.no_grad():
                model(**batch.to(model.device))
            index = torch.arange(len(last))
            per_layer = [
                captured[layer][index, last.to(captured[layer].device)]  # (B, H*d)
                .float()
                .cpu()
                .view(len(last), projections[layer][1].num_heads, projections[layer][1].head_dim)
                for layer in layers
            ]
            rows.append(torch.stack(per_layer, dim=1))  # (B, L, H, d)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def collect_hidden_states(model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Residual stream after every decoder layer at each text's last token: ``(N, L, hidden)``."""
    rows = []
    for batch, last in _last_token_batches(tokenizer, texts, batch_size):
        with torch.no_grad():
            states = model(**batch.to(model.device), output_hidden_states=True).hidden_states[1:]  # L x (B, T, hidden)
        index = torch.arange(len(last))
        rows.append(torch.stack([s[index, last.to(s.device)].float().cpu() for s in states], dim=1))
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------------------ ITI
def mass_mean_shift(activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions ``theta`` (mean of label-1 rows minus mean of label-0 rows) and the standard deviation
    ``sigma`` of all rows projected on them. ``activations``: ``(N, ..., d)``; returns ``(..., d)`` and ``(...)``."""
    labels = labels.bool()
    shift = activations[labels].mean(0) - activations[~labels].mean(0)
    theta = shift / shift.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projected = (activations * theta).sum(-1)  # (N, ...)
    return theta, projected.std(0)


def probe_accuracies(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    steps: int = 300,
    lr: float = 0.1,
    weight_decay: float = 1e-3,
) -> torch.Tensor:
    """Validation accuracy of a logistic-regression probe per head, all heads trained at once.

    ``*_x``: ``(N, L, H, d)``; ``*_y``: ``(N,)`` in {0, 1}. Features are standardised with the training statistics.
    Returns ``(L, H)``.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    weight = torch.zeros(train_x.shape[1:], requires_grad=True)  # (L, H, d)
    bias = torch.zeros(train_x.shape[1:3], requires_grad=True)  # (L, H)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    target = train_y.float().view(-1, 1, 1).expand(-1, *train_x.shape[1:3])
    for _ in range(steps):
        logits = (train_x * weight).sum(-1) + bias  # (N, L, H)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = ((val_x * weight).sum(-1) + bias) > 0
        return (predictions == val_y.bool().view(-1, 1, 1)).float().mean(0)


def iti_offsets(activations, labels, heads: list[list[int]], alpha: float) -> dict[tuple[int, int], torch.Tensor]:
    """``alpha * sigma * theta`` for each selected ``[layer, head]`` (mass-mean-shift direction)."""
    theta, sigma = mass_mean_shift(activations, labels)
    return {(layer, head): alpha * sigma[layer, head] * theta[layer, head] for layer, head in heads}


def adapter_with_offsets(model, offsets: dict[tuple[int, int], torch.Tensor], adapter_name: str = "default"):
    """A LoFiT adapter (offsets only) on exactly the heads of ``offsets``, with those values set."""
    config = LoFiTConfig(
        heads=[list(pair) for pair in offsets], use_offset=True, init_weights=True, inference_mode=True
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    projections = find_projections(peft_model.get_base_model(), config)
    with torch.no_grad():
        for layer, (name, _) in projections.items():
            module = peft_model.get_base_model().get_submodule(name)
            if not isinstance(module, LoFiTLayer) or adapter_name not in module.lofit_offset:
                continue
            for row, head in enumerate(module.heads_of(adapter_name)):
                module.lofit_offset[adapter_name][row] = offsets[(layer, head)].to(module.lofit_offset[adapter_name])
    return peft_model.eval()


def probe_selection(train_x, train_y, val_x, val_y, metadata: Optional[dict] = None) -> HeadSelection:
    """ITI's head ranking: every head scored by its probe's validation accuracy (see ``probe_accuracies``)."""
    return HeadSelection(scores=probe_accuracies(train_x, train_y, val_x, val_y).tolist(), metadata=metadata or {})


def iti_adapter(model, train_activations, train_labels, val_activations, val_labels, k: int, alpha: float = 15.0):
    """ITI as a LoFiT adapter: top-``k`` heads by validation probe accuracy, offsets ``alpha * sigma * theta``.

    Returns the PeftModel and the probe accuracies as a ``HeadSelection`` (scores = accuracies).
    """
    selection = probe_selection(
        train_activations, train_labels, val_activations, val_labels, metadata={"method": "iti", "alpha": alpha}
    )
    heads = selection.top(k)
    return adapter_with_offsets(model, iti_offsets(train_activations, train_labels, heads, alpha)), selection


# ----------------------------------------------------------------------------------------------------------- RepE
def reading_vectors(true_states: torch.Tensor, false_states: torch.Tensor) -> torch.Tensor:
    """First principal component of the paired differences, per layer, signed towards the true side.

    ``*_states``: ``(N, L, hidden)`` for the same N questions; returns unit vectors ``(L, hidden)``.
    """
    differences = true_states - false_states  # (N, L, hidden)
    vectors = []
    for layer in range(differences.shape[1]):
        centred = differences[:, layer] - differences[:, layer].mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        direction = vh[0]
        if (differences[:, layer] @ direction).mean() < 0:
            direction = -direction
        vectors.append(direction)
    return torch.stack(vectors)


def repe_offsets(model, vectors: dict[int, torch.Tensor], coefficient: float) -> dict[tuple[int, int], torch.Tensor]:
    """Head offsets ``v = pinv(W) c r`` for each layer's output projection ``W``, so that ``W v = c r``."""
    projections = find_projections(model, LoFiTConfig())
    offsets = {}
    for layer, direction in vectors.items():
        name, geometry = projections[layer]
        module = model.get_submodule(name)
        weight = module.weight.detach().float()
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            weight = weight.T
        v = torch.linalg.pinv(weight) @ (coefficient * direction.float())  # (H * d,)
        for head, part in enumerate(v.view(geometry.num_heads, geometry.head_dim)):
            offsets[(layer, head)] = part
    return offsets


def repe_adapter(model, vectors: dict[int, torch.Tensor], coefficient: float):
    """RepE-style steering as a LoFiT adapter: all heads of the given layers, ``W v = coefficient * r_l``."""
    return adapter_with_offsets(model, repe_offsets(model, vectors, coefficient))


def truthfulqa_probe_texts(questions) -> tuple[list[str], torch.Tensor]:
    """``"Q: {question} A: {answer}"`` for every true and false answer, with labels 1 / 0 (the ITI setup)."""
    texts, labels = [], []
    for item in questions:
        for answers, label in ((item.correct, 1), (item.incorrect, 0)):
            for answer in answers:
                texts.append(f"Q: {item.question} A: {answer}")
                labels.append(label)
    return texts, torch.tensor(labels)
