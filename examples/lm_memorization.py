#!/usr/bin/env python
"""CSL finds corrupted and conflicting sequences in causal-LM fine-tuning data (CPU, ~2 min).

A tiny Llama model is built from a ``transformers`` config (random weights, no download)
and trained with :class:`csl_fast.integrations.huggingface.CSLTrainer` on a generated
text set: each clean sequence is ``[marker, start, start + s, start + 2s, ...] mod V``,
the marker token choosing the step ``s``; the marker is a prompt token (label -100).
Two kinds of bad data are injected:

- *corrupted*: every token after the marker is uniformly random;
- *conflicting duplicates*: a copy of a clean sequence whose first half is identical and
  whose second half continues with another step (the language-model analogue of the
  paper's "duplicate with a different label").

CSL (each sequence's summed token loss over training, recorded by the fused cross entropy
during training at no extra cost) should rank the injected sequences near the top; the
script prints the AUROC of CSL, of the per-token mean loss and of the final loss.

    python examples/lm_memorization.py              # logits path (accumulate on [B*T, V] rows)
    python examples/lm_memorization.py --fused      # csl_fast.linear_cross_entropy head
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_data(n: int, length: int, vocab: int, frac_corrupt: float, frac_dup: float, seed: int):
    """``(input_ids [n, length], labels [n, length], kind [n])``; kind 0 clean, 1 corrupted,
    2 conflicting duplicate. Token ids: 0..2 are markers (steps 1, 2, 3), 3.. are content."""
    g = torch.Generator().manual_seed(seed)
    content = vocab - 3
    steps = torch.tensor([1, 2, 3])

    def clean(marker: int, start: int) -> torch.Tensor:
        pos = torch.arange(length - 1)
        return torch.cat([torch.tensor([marker]), 3 + (start + steps[marker] * pos) % content])

    ids = torch.empty(n, length, dtype=torch.int64)
    kind = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        ids[i] = clean(
            int(torch.randint(0, 3, (1,), generator=g)),
            int(torch.randint(0, content, (1,), generator=g)),
        )
    perm = torch.randperm(n, generator=g)
    n_cor, n_dup = int(frac_corrupt * n), int(frac_dup * n)
    for i in perm[:n_cor].tolist():
        ids[i, 1:] = 3 + torch.randint(0, content, (length - 1,), generator=g)
        kind[i] = 1
    half = length // 2
    sources = perm[n_cor + n_dup : n_cor + 2 * n_dup].tolist()
    for i, src in zip(perm[n_cor : n_cor + n_dup].tolist(), sources, strict=True):
        ids[i] = ids[src]
        marker = int(ids[src, 0])
        other = (marker + 1 + int(torch.randint(0, 2, (1,), generator=g))) % 3
        last = int(ids[src, half - 1]) - 3
        pos = torch.arange(1, length - half + 1)
        ids[i, half:] = 3 + (last + steps[other] * pos) % content
        kind[i] = 2
    labels = ids.clone()
    labels[:, 0] = -100  # the marker is a prompt token: not a target
    return ids, labels, kind


class TextSet(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": i}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--vocab", type=int, default=40)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--corrupt", type=float, default=0.05, help="fraction corrupted")
    p.add_argument("--dup", type=float, default=0.05, help="fraction conflicting duplicates")
    p.add_argument("--fused", action="store_true", help="csl_fast.linear_cross_entropy head")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import transformers
    from sklearn.metrics import roc_auc_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from csl_fast.integrations.huggingface import CSLTrainer

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ids, labels, kind = make_data(
        args.samples, args.length, args.vocab, args.corrupt, args.dup, args.seed
    )
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.length,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = CSLTrainer(
            model=model,
            args=targs,
            train_dataset=TextSet(ids, labels),
            csl_linear_cross_entropy=args.fused,
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    tracker = trainer.csl_tracker
    bad = (kind > 0).numpy()
    scores = {
        "CSL (summed token loss)": tracker.csl,
        "CSL per token (csl / count)": tracker.csl_mean,
        "final loss (last epoch)": tracker.last_loss,
        "1 - confidence": 1 - tracker.confidence,
    }
    result = {"wall_s": wall, "auroc": {}, "positives": int(bad.sum()), "samples": len(bad)}
    print(
        f"{args.samples} sequences of {args.length} tokens, {int((kind == 1).sum())} corrupted, "
        f"{int((kind == 2).sum())} conflicting duplicates; {args.epochs} epochs in {wall:.1f}s "
        f"({'linear_cross_entropy' if args.fused else 'logits + accumulate'})"
    )
    for name, s in scores.items():
        auc = float(roc_auc_score(bad, s.double().cpu().numpy()))
        result["auroc"][name] = auc
        per = {
            k: float(
                roc_auc_score((kind[kind != 3 - k] == k).numpy(), s[kind != 3 - k].cpu().numpy())
            )
            for k in (1, 2)
        }
        print(
            f"  AUROC {name:30s} {auc:.3f}   (corrupted {per[1]:.3f}, "
            f"conflicting duplicates {per[2]:.3f})"
        )
    top = torch.argsort(tracker.csl, descending=True)[: int(bad.sum())]
    prec = float((kind[top] > 0).float().mean())
    result["precision_at_k"] = prec
    print(f"  precision of CSL's top {len(top)}: {prec:.3f}")
    return result


if __name__ == "__main__":
    main()
