"""Score one batch of responses under the student and teacher prompts and compute the MSD loss.

Both sequences are `left-padded prompt | response | right padding`, so every row's response
starts at the same column P and the response logits are the positions P-1 .. P+T-2 under both
prompts: the tokens line up one-to-one by construction. Shapes: B rows, P prompt columns,
T response tokens, S = P + T sequence columns, H hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from msd import families
from msd.chunked import chunked_msd_loss
from msd.losses import LossOutput, LossSpec, msd_loss_with_stats
from msd.memory import trim_heap
from msd.padding import left_pad


@dataclass
class Batch:
    ids_BS: torch.Tensor  # prompt + response token ids
    mask_BS: torch.Tensor  # 1 on real tokens
    pos_BS: torch.Tensor  # position ids (0 at each row's first real token)
    prompt_cols: int  # P: response starts at this column


def build_inputs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> Batch:
    """(B, S = P + T) inputs: left-padded prompts followed by right-padded responses."""
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    T = max(1, max(len(r) for r in responses))
    ids_BT = torch.full((len(responses), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(responses), T), dtype=torch.long)
    for i, r in enumerate(responses):
        if r:
            ids_BT[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask_BT[i, :len(r)] = 1
    ids_BS, mask_BS = torch.cat([ids_BP, ids_BT], 1), torch.cat([mask_BP, mask_BT], 1)
    pos_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids_BS.to(device), mask_BS.to(device), pos_BS.to(device), ids_BP.shape[1])


def response_mask(responses: list[list[int]], device) -> torch.Tensor:
    T = max(1, max(len(r) for r in responses))
    mask_BT = torch.zeros((len(responses), T), dtype=torch.float32)
    for i, r in enumerate(responses):
        mask_BT[i, :len(r)] = 1.0
    return mask_BT.to(device)


def output_head(model):
    """The output projection (lm_head) of a causal LM, through PEFT/DDP wrappers."""
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    return inner.get_output_embeddings()


def response_hidden(model, batch: Batch, T: int) -> torch.Tensor:
    """(B, T, H) final hidden states at the positions that predict the T response tokens.

    They are taken as they enter the output head, which then projects nothing: a model's head
    over even one position per row costs as much as the decode steps' (a (B, 1, H) input goes
    through a batched matmul with the weight expanded per row), and `output_hidden_states`
    would keep every layer's states alive. A model whose forward does not call its head module
    falls back to `output_hidden_states`."""
    P = batch.prompt_cols
    taken: list[torch.Tensor] = []

    def take(_head, args, kwargs):
        h = args[0] if args else kwargs.get("input")
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            return None  # not a call we know: leave it alone
        taken.append(h)
        empty = h[..., :0, :]
        return ((empty,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": empty})

    handle = output_head(model).register_forward_pre_hook(take, with_kwargs=True)
    try:
        model(input_ids=batch.ids_BS, attention_mask=batch.mask_BS, position_ids=batch.pos_BS,
              use_cache=False, logits_to_keep=T + 1, output_hidden_states=False)
    finally:
        handle.remove()
    if taken and taken[0].shape[1] == T + 1:
        return taken[0][:, :T]
    if taken and taken[0].shape[1] == batch.ids_BS.shape[1]:  # a model that ignores logits_to_keep
        return taken[0][:, P - 1:P - 1 + T]
    taken.clear()  # nothing of the first forward is kept while the second runs
    out = model(input_ids=batch.ids_BS, attention_mask=batch.mask_BS, position_ids=batch.pos_BS,
                output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states[-1][:, P - 1:P - 1 + T]


def response_logits(model, batch: Batch, T: int) -> torch.Tensor:
    """(B, T, V) logits predicting the T response tokens (only the last T+1 positions are projected)."""
    out = model(input_ids=batch.ids_BS, attention_mask=batch.mask_BS, position_ids=batch.pos_BS,
                use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, :T]


def model_logits_spec(model, spec: LossSpec) -> LossSpec:
    """`spec` with the model's own logit scaling and soft-cap (`msd.families`), which its forward
    applies after lm_head. Fixed bug: only Gemma's soft-cap was applied; Granite's and Cohere's
    logit scales were ignored, so the chunked loss differed from the full-logits one."""
    t = families.logit_transform(families.model_config(model))
    return dataclasses.replace(spec, softcap=t.softcap, logit_scale=t.scale)


def msd_batch_loss(model, teacher, student_prompts, teacher_prompts, responses, pad_id,
                   spec: LossSpec, chunk_size: int) -> LossOutput:
    """The MSD loss of one batch (Eq. 8) and its per-token statistics.

    chunk_size: response tokens per chunk of the chunked loss (resolved for the device by the
    caller); 0 scores the full logits with the plain loss."""
    device = next(model.parameters()).device
    s_batch = build_inputs(student_prompts, responses, pad_id, device)
    t_batch = build_inputs(teacher_prompts, responses, pad_id, device)
    mask_BT = response_mask(responses, device)
    T = mask_BT.shape[1]
    # The chunked loss calls the teacher's head outside `teacher.scope()`, so it is only exact
    # when the head carries no LoRA adapter.
    head_adapted = hasattr(output_head(model), "lora_A")
    if chunk_size > 0 and not head_adapted:
        with teacher.scope() as t_model:
            t_hidden_BTH = response_hidden(t_model, t_batch, T)
            t_head = output_head(t_model)
        if device.type == "cpu":
            trim_heap()  # the teacher forward's freed activations, before the student's
        s_hidden_BTH = response_hidden(model, s_batch, T)
        spec = model_logits_spec(model, spec)
        return chunked_msd_loss(s_hidden_BTH, t_hidden_BTH, output_head(model), t_head, mask_BT,
                                spec, chunk_size=chunk_size)
    with teacher.scope() as t_model:
        t_logits_BTV = response_logits(t_model, t_batch, T)
    s_logits_BTV = response_logits(model, s_batch, T)
    return msd_loss_with_stats(s_logits_BTV, t_logits_BTV, mask_BT, spec)
