"""`python -m bertode.demo`: a 15-second tour of what bertode computes.

On a tiny random BERT (CPU, fp32, seconds): (1) one Euler step reproduces HF BERT's
logits and gradients; (2) solvers trade NFE against error from a tight reference;
(3) adjoint gradients agree with autograd through the solver.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForMaskedLM

import bertode


def _mlm_batch(vocab_size: int, batch: int, seq: int, generator: torch.Generator):
    ids = torch.randint(5, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq * 3 // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    hf_config = BertConfig(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=128,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = BertForMaskedLM(hf_config)
    with torch.no_grad():  # larger weights than BERT's init so that solvers disagree visibly
        for p in hf.bert.encoder.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    batch = _mlm_batch(hf_config.vocab_size, 4, args.seq, torch.Generator().manual_seed(1))

    print(f"bertode {bertode.__version__}  torch {torch.__version__}  "
          f"hidden={args.hidden} layers={args.layers} seq={args.seq} batch=4 fp32 CPU")
    print("\n(1) one Euler step on [0, 1] == BERT")
    same = bertode.from_bert(hf, solver="euler", steps=1)
    hf_out, our_out = hf(**batch), same(**batch)
    hf_out.loss.backward()
    our_out.loss.backward()
    ours = dict(same.named_parameters())
    grad_error = max((p.grad - ours[bertode.convert.rename_bert_key(n)].grad).abs().max().item()
                     for n, p in hf.named_parameters() if p.grad is not None)
    print(f"    max |logits - HF| = {(hf_out.logits - our_out.logits).abs().max().item():.2e}   "
          f"max |grad - HF| = {grad_error:.2e}")

    print("\n(2) solvers against a dopri5 reference at atol = rtol = 1e-8")
    reference = bertode.from_bert(hf, solver="dopri5", atol=1e-8, rtol=1e-8).eval()
    with torch.no_grad():
        target = reference(**batch).logits
    print(f"    {'solver':<22}{'NFE':>6}{'max |logits - ref|':>22}{'ms':>8}")
    for label, overrides in [("euler, 1 step (BERT)", dict(solver="euler", steps=1)),
                             ("euler, 8 steps", dict(solver="euler", steps=8)),
                             ("rk4, 2 steps", dict(solver="rk4", steps=2)),
                             ("dopri5, tol 1e-3", dict(solver="dopri5", atol=1e-3, rtol=1e-3)),
                             ("tsit5, tol 1e-5", dict(solver="tsit5", atol=1e-5, rtol=1e-5))]:
        model = bertode.from_bert(hf, **overrides).eval()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(**batch).logits
        elapsed = 1e3 * (time.perf_counter() - start)
        nfe = model.solver_stats()["nfe_forward"]
        print(f"    {label:<22}{nfe:>6}{(logits - target).abs().max().item():>22.2e}{elapsed:>8.1f}")

    print("\n(3) gradients: adjoint vs autograd through dopri5 (tol 1e-6)")
    grads = {}
    for sensitivity in ("autograd", "adjoint", "interpolated_adjoint"):
        model = bertode.from_bert(hf, solver="dopri5", atol=1e-6, rtol=1e-6, sensitivity=sensitivity,
                                  adjoint_atol=1e-6, adjoint_rtol=1e-6)
        model(**batch).loss.backward()
        grads[sensitivity] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "encoder" in n])
        stats = model.solver_stats()
        if sensitivity != "autograd":
            a, b = grads["autograd"].double(), grads[sensitivity].double()
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            print(f"    {sensitivity:<22} cosine {cosine:.6f}  relative error {((a - b).norm() / a.norm()).item():.2e}  "
                  f"NFE forward {stats['nfe_forward']} backward {stats['nfe_backward']}")


if __name__ == "__main__":
    main()
