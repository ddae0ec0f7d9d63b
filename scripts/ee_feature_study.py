"""Early-exit predictor feature study (EARLY_EXIT.md "Session 16").

Do full-head confidence features (max softmax, top-1 margin, entropy, candidate mass, "argmax is a candidate") let
the per-layer exit predictors exit earlier at the same token agreement than SpecEE's candidate features alone?
Closed-loop rollout states of vla_lift_ar at full depth (robosuite Lift, seeds 100000+, never evaluation seeds),
split by episode into train (60 %) / threshold (20 %) / test (20 %); every layer 1-6 checked; the exit rule as in
the runtime (score >= the layer's threshold and the layer's full argmax is a candidate). Prints (target precision,
layers per token, token agreement) on the test episodes for both feature sets, and the oracle.

    MUJOCO_GL=egl python scripts/ee_feature_study.py [EPISODES] [CACHE.pt]   # ~10 min on 1 core
"""
import sys, torch, numpy as np, json
from pathlib import Path
torch.set_num_threads(1)
from vla_runtime.policies.vla.policy import load_vla_policy
from vla_runtime.policies.vla import early_exit_train as T
from vla_runtime.policies.vla.early_exit import (EarlyExitConfig, build_candidates, previous_token_for,
                                                 final_norm_params, ar_head_weight)
P = Path(sys.argv[2] if len(sys.argv) > 2 else 'outputs/ee_feature_study_chunks.pt')
P.parent.mkdir(parents=True, exist_ok=True)
from vla_runtime.policies import resolve_checkpoint
pol = load_vla_policy(resolve_checkpoint('vla_lift_ar'), dtype='fp32')
model = pol.model
if P.exists():
    chunks = torch.load(P)
else:
    eps = T._rollout_observations(pol, 'robosuite:Lift', int(sys.argv[1]) if len(sys.argv) > 1 else 30, 100000, 40, 1400)
    print('episodes', len(eps), 'obs', sum(map(len, eps)), flush=True)
    chunks = T.collect_chunks(pol, eps)
    torch.save(chunks, P)
cfg = EarlyExitConfig()
mc = model.cfg; L = model.n_layers
norm_w, eps_ = final_norm_params(model); norm_w = norm_w.float()
head_w = ar_head_weight(model).float()
rows = []  # per token: dict
for ch in chunks:
    toks = ch['tokens'].tolist(); H = ch['hidden']
    for k in range(1, len(toks)):
        h = H[k - 1].float()
        prev = previous_token_for(k, toks, ch['prev'], mc.action_dim, mc.n_action_steps)
        n = torch.nn.functional.rms_norm(h, (h.shape[1],), norm_w, eps_)
        full = n @ head_w.t()  # (L, V)
        cand = build_candidates(prev, full[cfg.shallow_layer], cfg, mc.n_bins)
        if cand is None: continue
        lg = full[:, cand]; pr = torch.softmax(lg, -1)
        fp = torch.softmax(full, -1)
        top2 = full.topk(2, -1).values
        ent = -(fp * fp.clamp_min(1e-12).log()).sum(-1)
        ftop = full.argmax(-1)
        incand = (ftop[:, None] == cand[None]).any(-1).float()
        cmass = fp[:, cand].sum(-1)
        ext = torch.stack([fp.max(-1).values, top2[:, 0] - top2[:, 1], ent, cmass, incand], -1)
        cand_top = cand[lg.argmax(-1)]
        rows.append(dict(lg=lg, pr=pr, ext=ext, y=(cand_top == toks[k]), ok=(cand_top == toks[k]) & (ftop == toks[k]),
                         incand=incand.bool(), g=int(ch['group'])))
print('tokens', len(rows), flush=True)
groups = sorted({r['g'] for r in rows}); rng = np.random.default_rng(0); rng.shuffle(groups)
ng = len(groups); tr_g = set(groups[:int(ng * .6)]); va_g = set(groups[int(ng * .6):int(ng * .8)]); te_g = set(groups[int(ng * .8):])
print('groups', ng, len(tr_g), len(va_g), len(te_g))
layers = list(range(cfg.shallow_layer, L - 1))
def feats(r, j, extf):
    pprev = r['pr'][j - 1] if j - 1 >= cfg.shallow_layer else torch.zeros_like(r['pr'][j])
    f = [r['lg'][j], r['pr'][j], r['pr'][j] - pprev]
    if extf: f.append(r['ext'][j])
    return torch.cat(f)
res = {}
for extf in (False, True):
    nets = {}
    for j in layers:
        X = torch.stack([feats(r, j, extf) for r in rows if r['g'] in tr_g]); y = torch.stack([r['y'][j] for r in rows if r['g'] in tr_g]).float()
        torch.manual_seed(j)
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        class W(torch.nn.Module):
            def __init__(s, n): super().__init__(); s.n = n
            def forward(s, x): return s.n(x)[:, 0]
        w = W(net); T.fit_mlp(w, X, y, epochs=60, seed=j); nets[j] = w
    sc = {}
    with torch.no_grad():
        for split, gs in (('va', va_g), ('te', te_g)):
            R = [r for r in rows if r['g'] in gs]
            sc[split] = (R, {j: torch.sigmoid(nets[j](torch.stack([feats(r, j, extf) for r in R]))) for j in layers})
    curve = []
    for tp in (0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9):
        R, S = sc['va']
        thr = {}
        for j in layers:
            ok = torch.stack([r['ok'][j] for r in R])
            t, prec, frac = T.pick_threshold(S[j], ok, tp)
            thr[j] = t
        R, S = sc['te']
        nl = []; agree = 0
        for n_, r in enumerate(R):
            ran, good = L, True
            for j in layers:
                if S[j][n_] >= thr[j] and bool(r['incand'][j]):
                    ran = j + 1; good = bool(r['ok'][j]); break
            nl.append(ran); agree += good
        curve.append((tp, round(float(np.mean(nl)), 3), round(agree / len(R), 4)))
    res['ext' if extf else 'base'] = curve
    print('ext' if extf else 'base', curve, flush=True)
# oracle on test
R = sc['te'][0]
orc = [next((j + 1 for j in layers if bool(r['ok'][j])), L) for r in R]
print('oracle layers/token', np.mean(orc), 'test tokens', len(R))
print(json.dumps(res))
