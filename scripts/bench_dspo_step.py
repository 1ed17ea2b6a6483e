"""Benchmark of the DSPO training step, measured side by side in one run.

Prints:
  (a) DSPO step time / SFT step time on the same candidate batch (target <= 1.5),
  (b) DSPO loss reduction time at M = 64 instances / at M = 1 (target <= 1.5),
  (c) the batched DSPO step against a per-instance-pair loop doing the same math,
  (d) multi-pair DSPO reduction (hierarchical weights) at 64 instances x 6 pairs / at 1 instance x 1 pair
      (target <= 1.5).

    python scripts/bench_dspo_step.py [--device cuda] [--repeats 5] [--size 128] [--reduction-only]
"""
import argparse

import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.bench.dspo_step import bench_dspo_opt, synthetic_preference_batch
from dspo_basicsr.bench.timer import timed, timed_side_by_side
from dspo_basicsr.losses import diffusion_sft_loss, dspo_loss, dspo_pair_loss, hierarchical_weights, instance_coverage

from basicsr.models import build_model


def sft_step(model):
    """Plain diffusion loss on the same B x K candidates: one policy forward + backward, no reference."""
    model.optimizer_g.zero_grad(set_to_none=True)
    index = model.all_candidates()
    err_theta, _ = model.denoising_errors(index, with_reference=False)
    diffusion_sft_loss(err_theta).backward()
    model.optimizer_g.step()


def per_instance_loop_step(model, beta):
    """The same DSPO loss computed naively: for every instance, its two candidates through both networks."""
    model.optimizer_g.zero_grad(set_to_none=True)
    bare = model.bare
    coverage = instance_coverage(model.seg, model.win.shape[1], bare.vae_scale_factor)
    latents = model.encode_candidates(model.all_candidates())
    b, k = model.candidates.shape[:2]
    latents = latents.view(b, k, *latents.shape[1:])
    total = 0
    for i in range(b):
        cond = bare.condition(model.lq[i:i + 1], model.prompts[i:i + 1])
        noise = torch.randn_like(latents[i, :1])
        t = torch.randint(0, 1000, (1,), device=model.device)
        weights = coverage[i].sum((1, 2)) * (model.win[i] >= 0)
        weights = weights / weights.sum()
        for m in range(model.win.shape[1]):
            if model.win[i, m] < 0:
                continue
            deltas = []
            for cand in (model.win[i, m], model.lose[i, m]):
                x_t = bare.add_noise(latents[i, cand][None], noise, t)
                err = (model.net_g(x_t, t, cond) - noise).pow(2).mean(1)[0]
                with torch.no_grad():
                    err_ref = (model.net_ref.predict_noise(x_t, t, cond) - noise).pow(2).mean(1)[0]
                c = coverage[i, m]
                deltas.append(((err - err_ref) * c).sum() / c.sum())
            total = total - weights[m] * torch.nn.functional.logsigmoid(-beta * (deltas[0] - deltas[1]))
    (total / b).backward()
    model.optimizer_g.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--size', type=int, default=128, help='SR size of the synthetic candidates')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--candidates', type=int, default=4)
    parser.add_argument('--instances', type=int, default=16, help='instances per sample for (a) and (c)')
    parser.add_argument('--reduction-only', action='store_true', help='only the loss reductions (b) and (d)')
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.reduction_only:
        reductions(args, device, factor=8)
        return

    model = build_model(bench_dspo_opt(device))
    batch = synthetic_preference_batch(args.batch, args.candidates, args.instances, args.size, device)
    model.feed_data(batch)
    params = sum(p.numel() for p in model.bare.parameters()) / 1e6
    print(f'device {device}, framework {params:.1f} M parameters, batch {args.batch} x {args.candidates} candidates '
          f'at {args.size}px, {args.instances} instances')

    dspo, sft = timed_side_by_side(lambda: model.optimize_parameters(1), lambda: sft_step(model), args.repeats,
                                   device)
    dspo, sft = dspo.median, sft.median
    print(f'(a) DSPO step {dspo * 1e3:8.1f} ms | SFT step {sft * 1e3:8.1f} ms | ratio {dspo / sft:.2f} (target <= 1.5)')
    reductions(args, device, model.bare.vae_scale_factor)

    # The loop runs the same networks as the batched step just timed, so it needs no warm-up of its own.
    loop = timed(lambda: per_instance_loop_step(model, model.cri_pref.beta), 1, device, warmup=0).median
    print(f'(c) batched DSPO step {dspo * 1e3:8.1f} ms | per-instance-pair loop {loop * 1e3:8.1f} ms | '
          f'speed-up {loop / dspo:.1f}x')


def reductions(args, device, factor):
    """(b) and (d): the loss reduction alone, on fixed per-pixel errors, at few and many instances / pairs."""
    latent = args.size // factor
    g = torch.Generator(device='cpu').manual_seed(0)
    err_theta = torch.rand(args.batch, args.candidates, latent, latent, generator=g).to(device).requires_grad_()
    err_ref = torch.rand(args.batch, args.candidates, latent, latent, generator=g).to(device)

    def reduction(m):
        labels = torch.randint(0, m, (args.batch, args.size, args.size), generator=g).to(device)
        win = torch.randint(0, args.candidates, (args.batch, m), generator=g).to(device)
        lose = (win + 1) % args.candidates

        def run():
            coverage = instance_coverage(labels, m, factor)
            dspo_loss(err_theta, err_ref, coverage, win, lose).backward()
        return timed(run, max(args.repeats, 20), device).median

    m1, m64 = reduction(1), reduction(64)
    print(f'(b) loss reduction M=64 {m64 * 1e3:8.3f} ms | M=1 {m1 * 1e3:8.3f} ms | ratio {m64 / m1:.2f} '
          '(target <= 1.5)')

    def multi_pair(m, p):
        # Every unordered pair of the candidates, ordered by random scores: 6 pairs for 4 candidates.
        labels = torch.randint(0, m, (args.batch, args.size, args.size), generator=g).to(device)
        scores = torch.rand(args.batch, m, args.candidates, generator=g).to(device)
        first, second = torch.triu_indices(args.candidates, args.candidates, 1).to(device)[:, :p]
        a, b = first.expand(args.batch, m, -1), second.expand(args.batch, m, -1)
        better = scores.gather(2, a) > scores.gather(2, b)
        win, lose = torch.where(better, a, b), torch.where(better, b, a)

        def run():
            coverage = instance_coverage(labels, m, factor)
            pair_weights, instance_weights = hierarchical_weights(scores, win, lose)
            dspo_pair_loss(err_theta, err_ref, coverage, win, lose, pair_weights, instance_weights)[0].backward()
        return timed(run, max(args.repeats, 20), device).median

    pairs = min(6, args.candidates * (args.candidates - 1) // 2)
    one, many = multi_pair(1, 1), multi_pair(64, pairs)
    print(f'(d) multi-pair reduction M=64 x P={pairs} {many * 1e3:8.3f} ms | M=1 x P=1 {one * 1e3:8.3f} ms | '
          f'ratio {many / one:.2f} (target <= 1.5)')


if __name__ == '__main__':
    main()
