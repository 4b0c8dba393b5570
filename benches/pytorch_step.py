"""PyTorch reference for `tandem bench step`: the same training step (HF BertForPreTraining,
forward + backward + AdamW, dropout 0.1, fp32, MLM decoder over every position as HF does),
timed the same way (median of timed steps after warm-up). Prints one JSON line.

    /tmp/pyref/bin/python benches/pytorch_step.py --preset tiny --threads 1
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import BertConfig, BertForPreTraining

PRESETS = {
    "tiny": dict(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def batch(cfg, b, t, g):
    ids = torch.randint(5, cfg.vocab_size, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    n_mask = max(1, round(t * 0.15))
    for i in range(b):
        pos = torch.randint(1, t, (n_mask,), generator=g)
        labels[i, pos] = ids[i, pos]
        ids[i, pos] = 4
    tt = (torch.arange(t) > t // 2).long().expand(b, t)
    nsp = torch.randint(0, 2, (b,), generator=g)
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=torch.ones(b, t, dtype=torch.long), labels=labels, next_sentence_label=nsp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = BertConfig(**PRESETS[a.preset], hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForPreTraining(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    times = []
    for s in range(a.warmup + a.steps):
        b = batch(cfg, a.batch, a.seq, g)
        t0 = time.perf_counter()
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    print(json.dumps(dict(
        impl=f"pytorch {torch.__version__}", preset=a.preset, threads=a.threads, batch=a.batch, seq=a.seq,
        ms_per_step=med, samples_per_s=a.batch / (med / 1e3),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )))


if __name__ == "__main__":
    main()
