"""What a training run reports: per-step statistics, logs.jsonl, TensorBoard / W&B, and the
token batches (tokens with their DPSW weight and divergence) behind `msd report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from msd import families, tokentext
from msd.config import to_dict
from msd.errors import MsdError
from msd.io import JsonlWriter, atomic_write_text, read_jsonl

LOGS = "logs.jsonl"


def default_refusal_check() -> Callable[[str, str], bool]:
    try:
        from msd.eval.judges.keyword import is_refusal
        return is_refusal
    except ImportError:  # evaluation extras missing: log no refusal rate
        return lambda text, lang: False


def new_stats() -> dict:
    return {"loss": 0.0, "divergence": 0.0, "dpsw_weight": 0.0, "weight_max": 0.0, "response_len": 0.0,
            "refusal_rate": 0.0, "tokens": 0, "gen_s": 0.0}


def accumulate_stats(stats, out, responses, rows, tokenizer, refusal_check, accum) -> None:
    """Add one micro-batch's loss output to the step's statistics (means over micro-batches)."""
    mask = out.mask_BT
    n_tok = float(mask.sum())
    stats["loss"] += float(out.loss.detach()) / accum
    stats["divergence"] += float((out.div_BT * mask).sum() / max(n_tok, 1.0)) / accum
    stats["weight_max"] += float(out.w_BT.max(dim=-1).values.mean()) / accum
    if out.w_raw_BT is not None:  # mean unnormalised DPSW weight w^T * w^S over response tokens
        stats["dpsw_weight"] += float((out.w_raw_BT * mask).sum() / max(n_tok, 1.0)) / accum
    stats["response_len"] += n_tok / len(responses) / accum
    texts = [families.decode_answer(tokenizer, r)[0] for r in responses]  # the answer, as judged
    stats["refusal_rate"] += sum(refusal_check(t, it.lang) for t, it in zip(texts, rows)) / len(rows) / accum
    stats["tokens"] += int(n_tok)


def save_token_batch(path: Path, step: int, mode: str, batch, responses, out, tokenizer) -> None:
    """One record per response: its token ids, their text as spans of whole characters
    ([text, start, end], msd.tokentext.token_spans), and each token's DPSW weight and divergence
    (for `msd report`). Fixed bug: the raw pieces were saved (`convert_ids_to_tokens`), which
    for a byte-level BPE are bytes in disguise (`à¤ħ`), unreadable outside English."""
    rows = []
    for i, (it, resp) in enumerate(zip(batch, responses)):
        n = len(resp)
        rows.append({"step": step, "mode": mode, "lang": it.lang, "query_id": it.query_id,
                     "ids": [int(t) for t in resp],
                     "spans": [list(s) for s in tokentext.token_spans(tokenizer, resp)],
                     "weights": [round(float(x), 5) for x in out.w_BT[i, :n].tolist()],
                     "divergence": [round(float(x), 6) for x in out.div_BT[i, :n].tolist()]})
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def drop_logs_after(out_dir: Path, step: int) -> None:
    """Drop log lines of steps after a checkpoint: a resumed run is about to redo them."""
    path = out_dir / LOGS
    if path.exists():
        kept = [rec for rec in read_jsonl(path) if rec.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in kept))


class Logger:
    """logs.jsonl plus the optional trackers, on the main process only."""

    def __init__(self, cfg, out_dir: Path, main: bool):
        tc = cfg.train
        self.log = JsonlWriter(out_dir / LOGS) if main else None
        self.tb = _tensorboard(out_dir) if tc.tensorboard and main else None
        self.wb = _wandb(cfg) if tc.wandb and main else None

    def write(self, record: dict, step: int) -> None:
        if self.log:
            self.log.write_many([record])
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wb:
            self.wb.log(record, step=step)

    def close(self) -> None:
        if self.log:
            self.log.close()
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MsdError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out_dir / "tb"))


def _wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise MsdError("train.wandb needs the wandb package (pip install wandb)") from None
    return wandb.init(config=to_dict(cfg), dir=cfg.train.output_dir)
