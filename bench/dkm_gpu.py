"""GPU checks and the GPU DKM benchmark, as one script for a short lease on a CUDA machine.

1. CUDA correctness: the k-means engine, the soft k-means (both engines) and the palettizers
   give on CUDA what they give on CPU.
2. DKM on a 134M-parameter LLaMA-shaped causal LM (transformers LlamaConfig: hidden 768,
   12 layers, intermediate 2048, vocab 32000; random init; batch 8 x 512 tokens, bf16 autocast,
   AdamW; every nn.Linear, LM head included, at 4 bits): step time and peak CUDA memory vs plain
   training, in one process, plain first.

Run:  python bench/dkm_gpu.py [--out results.json] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_palettize import DKMPalettizer, PostTrainingPalettizer  # noqa: E402
from lightning_palettize.kmeans import kmeans_1d, kmeans_vectors  # noqa: E402
from lightning_palettize.soft_kmeans import soft_kmeans  # noqa: E402


def check(name: str, ok: bool, detail: str = "") -> dict:
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    return {"check": name, "ok": bool(ok), "detail": detail}


def correctness() -> list[dict]:
    out = []
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50000, generator=g) * 0.02
    cpu, gpu = kmeans_1d(x, 16), kmeans_1d(x.to(dev), 16)
    out.append(
        check(
            "kmeans_1d cuda == cpu",
            torch.equal(cpu.labels, gpu.labels.cpu())
            and torch.allclose(cpu.centroids, gpu.centroids.cpu()),
        )
    )
    v = kmeans_vectors(torch.randn(2, 4000, 2, generator=g).to(dev), 8)
    out.append(check("kmeans_vectors on cuda", bool(torch.isfinite(v.centroids).all())))
    for method in ("table", "dense"):
        w = (torch.randn(2, 30000, 1, generator=g) * 0.05).half().float()
        c0 = kmeans_1d(w[..., 0], 16).centroids.unsqueeze(-1)
        res = []
        for d in ("cpu", "cuda"):
            wd = w.to(d).requires_grad_(True)
            y, _ = soft_kmeans(wd, c0.to(d), method=method, epsilon=0.0)
            (gr,) = torch.autograd.grad(
                (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(d)).sum(), wd
            )
            res.append((y.detach().cpu(), gr.cpu()))
        err_y = (res[0][0] - res[1][0]).abs().max().item()
        err_g = ((res[0][1] - res[1][1]).norm() / res[0][1].norm()).item()
        out.append(
            check(
                f"soft_kmeans[{method}] cuda == cpu",
                err_y < 1e-5 and err_g < 1e-4,
                f"max|dy|={err_y:.2e} rel|dg|={err_g:.2e}",
            )
        )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    a = PostTrainingPalettizer(model, {"global_config": {"n_bits": 3}}).compress(progress=False)
    b = PostTrainingPalettizer(model.to(dev), {"global_config": {"n_bits": 3}}).compress(
        progress=False
    )
    cfg = {"global_config": {"n_bits": 3, "weight_threshold": 0}}
    out.append(
        check("PTP cuda == cpu", all(torch.equal(a[i].weight, b[i].weight.cpu()) for i in (0, 2)))
    )
    model = model.cpu()
    xb = torch.randn(32, 256)
    results = []
    for d in ("cpu", "cuda"):
        m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
        m.load_state_dict(model.state_dict())
        m = m.to(d)
        pal = DKMPalettizer(m, cfg)
        prepared = pal.prepare(inplace=True)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            prepared(xb.to(d)).square().mean().backward()
            opt.step()
            pal.step()
        results.append(pal.finalize()[0].weight.detach().cpu())
    diff = (results[0] - results[1]).abs().max().item()
    out.append(check("DKM 3 steps + finalize cuda ~= cpu", diff < 1e-4, f"max diff {diff:.2e}"))
    return out


def llama(steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        vocab_size=32000,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    state = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = torch.randint(0, 32000, (8, 512), generator=torch.Generator().manual_seed(1)).to(dev)

    def run(dkm: bool) -> dict:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        model = model.to(dev).train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        pal = None
        t0 = time.perf_counter()
        if dkm:
            pal = DKMPalettizer(
                model,
                {"module_type_configs": {"Linear": {"n_bits": 4, "weight_threshold": 0}}},
            )
            model = pal.prepare(inplace=True)
        torch.cuda.synchronize()
        prepare_s = time.perf_counter() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times, losses = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            if pal is not None:
                pal.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated() - base_mem
        res = {
            "prepare_s": prepare_s,
            "first_step_s": times[0],
            "steady_step_s": statistics.median(times[2:]),
            "peak_mem_GiB": peak / 2**30,
            "losses": losses,
        }
        if pal is not None:
            n_pal = sum(1 for n, _ in model.named_modules() if n.endswith("_dkm"))
            res["palettized_weights"] = n_pal
        del model, opt
        torch.cuda.empty_cache()
        return res

    plain = run(False)
    ours = run(True)
    return {
        "params": n_params,
        "plain": plain,
        "dkm": ours,
        "step_ratio": ours["steady_step_s"] / plain["steady_step_s"],
        "mem_ratio": ours["peak_mem_GiB"] / plain["peak_mem_GiB"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/dkm_gpu.json")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    out: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    try:
        out["correctness"] = correctness()
    except Exception:
        out["correctness_error"] = traceback.format_exc()
        print(out["correctness_error"], flush=True)
    try:
        out["llama"] = llama(args.steps)
        print(json.dumps({k: v for k, v in out["llama"].items()}, indent=1), flush=True)
    except Exception:
        out["llama_error"] = traceback.format_exc()
        print(out["llama_error"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
