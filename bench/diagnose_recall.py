"""The trainability diagnosis of 2026-12-01 (docs/training.md): associative recall at 128
tokens (8 pairs, 8 queries, batch 64, 2 layers, hidden 256, 4 heads = 4 KV heads, AdamW
lr 1e-3, warmup 200, cosine over 8,000 steps, bf16 autocast), one variant and seed per
process, held-out accuracy per query index and per key position, mean gates at every
position and at the query positions, and at the end the loss gradients of the trained
model on the kernels (bf16 autocast and fp32) against the float64 reference path.

Variants: dense (SDPA), causal (SparseAttention("causal")), gg (gate(causal, causal)),
g1 (gate(causal)), nsa (NativeSparseAttention), nsa_fixed (gates frozen at 0.5),
nsa_kv (independent keys and values per branch). Run on a GPU, one process per run:

    python bench/diagnose_recall.py --variant nsa --seed 0 --time-limit 330 --out DIR
"""
import sys, time, math, argparse, json, warnings, os
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
from train_recall import recall_batch, DenseAttention, RecallModel
import sparsedsl
from sparsedsl.nn import SparseAttention, NativeSparseAttention

p = argparse.ArgumentParser()
p.add_argument("--variant", default="dense"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=8000); p.add_argument("--time-limit", type=float, default=480)
p.add_argument("--out", default="."); p.add_argument("--warm", action="store_true")
a = p.parse_args()
EVERY = int(os.environ.get("EVERY", 500))
SEQ, PAIRS, Q, HID, HEADS, BATCH = 128, 8, 8, 256, 4, 64
torch.manual_seed(a.seed)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GG = sparsedsl.compile_source("pattern gg() {\n a = causal\n b = causal\n return gate(a, b)\n}")
G1 = sparsedsl.compile_source("pattern g1() {\n a = causal\n return gate(a)\n}")
def make():
    v = a.variant
    if v == "dense": return DenseAttention(HID, HEADS, HEADS)
    if v == "causal": return SparseAttention("causal", HID, HEADS, HEADS)
    if v == "gg": return SparseAttention(GG, HID, HEADS, HEADS)
    if v == "g1": return SparseAttention(G1, HID, HEADS, HEADS)
    if v == "nsa_kv": return NativeSparseAttention(HID, HEADS, HEADS, kv_per_branch=True)
    if v.startswith("nsa"): return NativeSparseAttention(HID, HEADS, HEADS)
vocab = (64, 64, 64)
model = RecallModel(sum(vocab), HID, 2, make).to(dev)
if a.variant == "nsa_fixed":  # gates frozen at sigmoid(0) = 0.5
    for blk in model.blocks:
        torch.nn.init.zeros_(blk.attention.gate_proj.weight); torch.nn.init.zeros_(blk.attention.gate_proj.bias)
        blk.attention.gate_proj.requires_grad_(False)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
data = torch.Generator().manual_seed(a.seed); held = torch.Generator().manual_seed(10000 + a.seed)
autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
gate_log = {}
def hook(name):
    def f(mod, inp, out):
        gate_log[name] = torch.sigmoid(out.float()).detach()
    return f
for i, blk in enumerate(model.blocks):
    if getattr(blk.attention, "gate_proj", None) is not None:
        blk.attention.gate_proj.register_forward_hook(hook(i))

def evaluate(n=8):
    model.eval(); per_q = torch.zeros(Q); tot = 0; gates = {}
    dist_c = torch.zeros(8); dist_n = torch.zeros(8)
    with torch.no_grad(), autocast:
        for _ in range(n):
            tok, at = recall_batch(BATCH, SEQ, PAIRS, Q, vocab, held, dev)
            ok = (model(tok, at).argmax(-1) == tok[:, at + 1]).float().cpu()  # (B, Q)
            per_q += ok.sum(0); tot += ok.shape[0]
            # where was the pair? position of the key in context
            t = tok.cpu(); keys = t[:, at.cpu()]
            for b in range(t.shape[0]):
                for qi in range(Q):
                    pos = (t[b, :SEQ - 2 * Q] == keys[b, qi]).nonzero()
                    bucket = min(7, int(pos[0]) * 8 // (SEQ - 2 * Q)) if len(pos) else 7
                    dist_c[bucket] += ok[b, qi]; dist_n[bucket] += 1
            for k, g in gate_log.items():
                G = g.view(g.shape[0], SEQ, HEADS, -1)
                gates.setdefault(k, []).append((G.mean((0, 1, 2)).tolist(), G[:, at].mean((0, 1, 2)).tolist()))
    model.train()
    per_q = (per_q / tot).tolist()
    return sum(per_q) / Q, per_q, (dist_c / dist_n.clamp(min=1)).tolist(), {k: v[-1] for k, v in gates.items()}

log = {"variant": a.variant, "seed": a.seed, "evals": []}
t0 = time.time()
for step in range(a.steps):
    tok, at = recall_batch(BATCH, SEQ, PAIRS, Q, vocab, data, dev)
    with autocast:
        logits = model(tok, at)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tok[:, at + 1].flatten())
    opt.zero_grad(set_to_none=True); loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    if a.warm and step == 3: print("warm", a.variant); sys.exit(0)
    if (step + 1) % EVERY == 0 or step + 1 == a.steps:
        acc, per_q, by_pos, gates = evaluate()
        log["evals"].append(dict(step=step + 1, loss=loss.item(), gnorm=gn.item(), acc=acc, per_query=per_q, by_key_position=by_pos, gates=gates, t=time.time() - t0))
        print(f"{a.variant} s{a.seed} {step+1} loss {loss.item():.3f} acc {acc:.3f} perq {[round(x,2) for x in per_q]} {time.time()-t0:.0f}s", flush=True)
        json.dump(log, open(f"{a.out}/{a.variant}_s{a.seed}.json", "w"))
    if time.time() - t0 > a.time_limit: break
# stalled-checkpoint check: kernels (bf16 autocast and fp32) vs float64 reference, loss gradients
if a.variant.startswith("nsa") or a.variant in ("gg", "g1"):
    import copy
    tok, at = recall_batch(BATCH, SEQ, PAIRS, Q, vocab, held, dev)
    def grads(m, ac, dt):
        m = copy.deepcopy(m).to(dt); m.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ac and dev.type == "cuda"):
            lg = m(tok, at)
        F.cross_entropy(lg.float().flatten(0, 1), tok[:, at + 1].flatten()).backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
    ref = grads(model, False, torch.float64)
    for name, (ac, dt) in {"bf16": (True, torch.float32), "fp32": (False, torch.float32)}.items():
        g = grads(model, ac, dt)
        worst = max(((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref if ref[n].norm() > 1e-6)
        per = {n: round(((g[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)).item(), 5) for n in ref if ref[n].norm() > 1e-6 and ("gate" in n or "attention" in n)}
        log[f"grad_rel_err_{name}"] = worst; log[f"grad_rel_err_{name}_attn"] = per
        print(a.variant, name, "worst grad rel err vs float64 reference", worst, flush=True)
    json.dump(log, open(f"{a.out}/{a.variant}_s{a.seed}.json", "w"))
