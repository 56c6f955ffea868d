"""Re-measure frontier_common's prompt sweep points with the redesigned scorer (prefix KV cache, one engine) and
compare them with the committed report. Usage: python docs/results/smollm2/reproduce_prompt_points.py energy power
(writes /tmp/repro_prompt.json; the committed copy is reproduction_prompt_points.json)."""
import json, sys, torch
torch.set_num_threads(1)
from persona_kernels.models import load_model
from persona_kernels.evaluation import tasks as T, sweep as S, conditions as C
from persona_kernels.paths import shared_dir
SHARED = shared_dir(required=True)
rep = json.load(open("docs/results/smollm2/frontier_common/report.json"))
model, tok = load_model(None, dtype=torch.float32, padding_side="right"); model.eval()
hs = T.load_task("hellaswag", shared=SHARED, seed=0, limit=12)
cap = T.Task("capability", "text", hs.path, None, False, hs.split, T.capability_texts(hs.items[:12]))
assert cap.split.evaluation[:12] == rep["capability_texts"]["hellaswag_indices"][:12], "capability items differ"
base = T.score_items(model, tok, cap)["capability"]
print("base capability new", float(base.mean()), "committed", rep["sweep"]["base_capability"])
out = {}
for pair in sys.argv[1:]:
    task = T.load_task(pair, shared=SHARED, seed=0, limit=16, calib_limit=32)
    p = S._switch_point(model, tok, task, cap, (None, None), 0.0, base, 16, systems=C.system_prompts(pair))
    old = rep["sweep"]["prompt"][pair]
    diff = max(abs(a - b) for a, b in zip(p["items"], old["items"]))
    print(pair, "switch new", p["switch"], "old", old["switch"], "max item diff", diff,
          "cap loss new/old", p["capability_loss"], old["capability_loss"])
    out[pair] = {"new": {k: p[k] for k in ("switch", "capability_loss")}, "committed": {k: old[k] for k in ("switch", "capability_loss")},
                 "max_abs_item_difference": diff}
json.dump({"base_capability": {"new": float(base.mean()), "committed": rep["sweep"]["base_capability"]}, "pairs": out},
          open("/tmp/repro_prompt.json", "w"), indent=1)
