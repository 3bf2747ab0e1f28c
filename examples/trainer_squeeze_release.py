"""Squeeze-Release on a transformers model trained with transformers' Trainer, as a user runs it.

    python examples/trainer_squeeze_release.py [--cycles 2] [--epochs 4] [--out DIR]

A BERT classifier (random weights from a config: nothing is downloaded) learns a synthetic task: is token 5 more
frequent than token 6 in the sequence. ``train`` is the Trainer the user already has; the example inputs are one
batch of the training data as the collator gives it (a dict with ``labels``); what comes back is a
``BertForSequenceClassification``, smaller, saved with ``fp.save`` and rebuilt with ``fp.load`` from the
original config. On a machine with a GPU the Trainer trains there; the example inputs stay a CPU batch.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import transformers

import fxprune as fp
from fxprune.verify import count_params


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, vocab: int = 32, length: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, length), generator=g)
        self.labels = ((self.ids == 5).sum(1) > (self.ids == 6).sum(1)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per train call")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--out", default=None, help="directory for fp.save (default: a temporary one)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    train_set, val_set = Tokens(a.samples, 0), Tokens(256, 1)

    def train(m: torch.nn.Module) -> None:  # the user's Trainer, unchanged
        args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=a.epochs,
                                              per_device_train_batch_size=64, learning_rate=2e-3, report_to=[],
                                              save_strategy="no", logging_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=m, args=args, train_dataset=train_set).train()

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> float:
        m.eval()
        device = next(m.parameters()).device  # (the Trainer put it on the GPU, where there is one)
        batch = {k: v.to(device) for k, v in val_set[:].items()}  # (a dict of the whole split)
        return float((m(**batch).logits.argmax(-1) == batch["labels"]).float().mean())

    train(model)
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=8)))  # the collator's dict, labels included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fp.interop.module.KeptChannelsWarning)  # channels its class cannot drop stay
        result = fp.squeeze_release(model, batch, train=train, evaluate=evaluate, cycles=a.cycles, progress=False)
    small = result.module
    print(result.table())
    out = a.out or tempfile.mkdtemp()
    fp.save(small, out)
    back = fp.load(out, lambda: transformers.BertForSequenceClassification(config))
    device = next(small.parameters()).device
    back = back.to(device)
    probe = {k: v.to(device) for k, v in val_set[:5].items()}
    same = torch.equal(back.eval()(**probe).logits, small.eval()(**probe).logits)
    summary = dict(cls=type(small).__name__, params_dense=count_params(model), params=count_params(small),
                   accuracy_dense=result.dense["accuracy"], accuracy=evaluate(small), reloaded_equal=same)
    print(f"{summary['cls']}: {summary['params_dense']:,} -> {summary['params']:,} parameters "
          f"({summary['params_dense'] / summary['params']:.1f}x), validation accuracy {summary['accuracy_dense']:.3f} -> "
          f"{summary['accuracy']:.3f}; fp.load gives the same logits: {same}")
    return summary


if __name__ == "__main__":
    main()
