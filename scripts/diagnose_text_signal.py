#!/usr/bin/env python
"""Does a finished text run's aux signal depend on the text? Measured on its own weights and head.

For a grouped-SigLIP run (3.3 and its controls) this prints, as JSON:
- on training batches, the aux and CE gradients on the shared (backbone) parameters:
  their norm ratio, their cosine, and the cosine between the aux gradient with the
  run's texts and with the same texts shuffled among the pairs (1.0 = the gradient
  the segmenter gets does not depend on what the texts say);
- on the validation split, how well the trained head tells a pair's own text from
  another pair's: the AUC of its logit for (pair, own text) against (pair, shuffled
  text), 0.5 = chance; and the same against a text of the same class from another
  image (does it read the diagnosis, or only the class name?).

    python scripts/diagnose_text_signal.py --config config/privileged.yaml --run priv/matched \
        --weights results/priv/matched/weights.pth --batches 6
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
import torch.nn.functional as F

from ttdl.core.cli import add_run_arguments, run_settings
from ttdl.jobs.train import Trainer
from ttdl.text.grad_balance import grad_stats
from ttdl.text.heads import image_side, normalised
from ttdl.text.text_sources import Counters, TextItems, shuffle_texts


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    diff = positive.view(-1, 1) - negative.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def same_class_swap(tb, items: TextItems, generator: torch.Generator) -> tuple[TextItems, list[int]] | None:
    """Each text replaced by the text of another image's pair of the same class, with the indices of the
    items that had one (None when none had)."""
    by_class: dict[int, list[int]] = {}
    for i, p in enumerate(items.positions):
        by_class.setdefault(tb.classes[p], []).append(i)
    texts, keep = [], []
    for i, p in enumerate(items.positions):
        others = [j for j in by_class[tb.classes[p]] if tb.rows[items.positions[j]] != tb.rows[p]]
        if others:
            j = others[int(torch.randint(len(others), (1,), generator=generator))]
            texts.append(items.texts[j])
            keep.append(i)
    if not keep:
        return None
    return TextItems([items.positions[i] for i in keep], texts, [True] * len(keep)), keep


class Probe:
    def __init__(self, trainer: Trainer):
        self.trainer, self.objective = trainer, trainer.objective
        self.head, self.cfg = self.objective.head, self.objective.cfg
        if not hasattr(self.head, "mlp") or self.cfg.name not in ("grouped_siglip", "variable_siglip"):
            raise SystemExit(f"this diagnosis reads grouped/variable SigLIP heads; run has {self.cfg.name!r}")

    def forward(self, batch):
        model = self.trainer.model
        images, masks = batch["image"], batch["mask"]
        logits, bottleneck = model(images)
        tb = self.objective._text_batch(batch, images, masks, logits.detach().max(1).indices)
        items = self.objective.source(tb, Counters())
        return logits, bottleneck, masks, tb, items

    def pair_logits(self, tb, items, bottleneck, logits) -> torch.Tensor:
        emb = self.objective._embed(items.texts, bottleneck.device)
        probs = torch.softmax(logits.detach().float(), dim=1)
        img, txt = normalised(self.cfg, image_side(self.cfg, tb, items, bottleneck, probs), self.head.mlp(emb))
        scale, bias = self.head.logit()
        return scale * (img * txt).sum(-1) + bias

    def aux(self, tb, items, bottleneck, logits):
        emb = self.objective._embed(items.texts, bottleneck.device)
        return self.head(tb=tb, items=items, emb=emb, bottleneck=bottleneck, pixel_ce=None, valid=None,
                         probs=torch.softmax(logits.detach().float(), dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--weights", required=True, help="the run's weights.pth (its aux head is carried over)")
    parser.add_argument("--batches", type=int, default=6, help="training batches for the gradient measures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = run_settings(args)
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(run, scratch, init_weights=args.weights, log=lambda *_: None)
        probe = Probe(trainer)
        trainer.model.eval()  # BatchNorm statistics stay those of the run
        shared = trainer.model.shared_parameters()
        grads = {"ratio_aux_ce": [], "cos_aux_ce": [], "cos_matched_shuffled": []}
        for index, batch in enumerate(trainer.epoch_loader(0)):
            if index >= args.batches:
                break
            logits, bottleneck, masks, tb, items = probe.forward(batch)
            if len(items.texts) < 2:
                continue
            ce = F.cross_entropy(logits.float(), masks, ignore_index=trainer.ignore_index)
            matched = probe.aux(tb, items, bottleneck, logits)
            shuffled = probe.aux(tb, shuffle_texts(items, generator), bottleneck, logits)
            with_ce = grad_stats(ce, matched, shared)
            between = grad_stats(matched, shuffled, shared)
            grads["ratio_aux_ce"].append(with_ce.aux_norm / max(with_ce.ce_norm, 1e-12))
            grads["cos_aux_ce"].append(with_ce.cosine)
            grads["cos_matched_shuffled"].append(between.cosine)
        own, other, same_class_own, same_class_other = [], [], [], []
        with torch.no_grad():
            for batch in trainer.val_loader():
                logits, bottleneck, _, tb, items = probe.forward(batch)
                if len(items.texts) < 2:
                    continue
                z = probe.pair_logits(tb, items, bottleneck, logits)
                own.append(z)
                other.append(probe.pair_logits(tb, shuffle_texts(items, generator), bottleneck, logits))
                swapped = same_class_swap(tb, items, generator)
                if swapped is not None:
                    swap_items, keep = swapped
                    same_class_own.append(z[keep])
                    same_class_other.append(probe.pair_logits(tb, swap_items, bottleneck, logits))
        trainer.objective.close()
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0)  # noqa: E731
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    scale, bias = (float(v.detach()) for v in probe.head.logit())
    print(json.dumps({
        "run": run.run_id, "weights": args.weights, "train_batches": len(grads["cos_aux_ce"]),
        "grad_norm_ratio_aux_over_ce_unweighted": mean(grads["ratio_aux_ce"]),
        "grad_cos_aux_ce": mean(grads["cos_aux_ce"]),
        "grad_cos_matched_vs_shuffled_texts": mean(grads["cos_matched_shuffled"]),
        "val_pairs": int(cat(own).numel()),
        "head_auc_own_vs_shuffled_text": auc(cat(own), cat(other)),
        "head_auc_own_vs_same_class_other_image_text": auc(cat(same_class_own), cat(same_class_other)),
        "head_logit_scale": scale, "head_logit_bias": bias,
    }, indent=2))


if __name__ == "__main__":
    main()
