"""``slim-ray report``: the run's results as a researcher would publish them.

Reads only stage outputs (eval/metrics.json and the manifests of the generation, distillation and
training stages) and writes ``report/report.md`` plus PNG plots, all through ``slim_ray.storage``
(the run folder may be a path or a URI such as ``s3://bucket/prefix``):

- the results table in the paper's layout (NDCG@10, HR@10, HR@20 on sampled-100) and the same for
  full ranking, mean +- std over seeds, SLIM's relative gain over the better of backbone /
  backbone+, the paired significance test, and the paper's Amazon Games figures for orientation;
- the cost table (teacher vs student tokens, seconds per rationale, estimated $);
- an honest paragraph derived from the numbers (not a fixed text).
"""

from __future__ import annotations

import io
import re
from typing import Any, Optional

from slim_ray import storage
from slim_ray.rec.config import FULL_PREFIX_VARIANT, split_variant_name

# Paper (WWW 2024), Amazon Games, SASRec backbone, sampled-100, in %.
PAPER_GAMES_SASREC = {
    "id": {"ndcg@10": 22.73, "hr@10": 37.77},
    "id_text": {"ndcg@10": 27.46, "hr@10": 44.88},
    "slim:teacher": {"ndcg@10": 31.58, "hr@10": 50.83},
    "slim:student": {"ndcg@10": 31.43, "hr@10": 51.11},
}
PAPER_COST = {"student_s_per_rationale_a100": 6.11, "chatgpt_s_per_call": 5.54}

VARIANT_LABEL = {
    "id": "{B}",
    "id_text": "{B}+ (item text)",
    "slim:teacher": "SLIM⁻ (teacher rationales)",
    "slim:student": "SLIM (student rationales)",
    "text:student": "ID-agnostic text (student)",
    "text:teacher": "ID-agnostic text (teacher)",
}
VARIANT_ORDER = list(VARIANT_LABEL)
BACKBONE_LABEL = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "srgnn": "SRGNN"}
COLS = ("ndcg@10", "hr@10", "hr@20")


def _read_json(path: str) -> Optional[dict[str, Any]]:
    return storage.read_json(path)


def _summary(stage_dir: str) -> dict[str, Any]:
    m = _read_json(storage.join(stage_dir, "manifest.json")) or {}
    return m.get("summary", {})


def _sorted_variants(variants: dict[str, Any]) -> list[str]:
    """The paper's order; a variant's full-prefix reading, per-step and leaky runs right after it."""
    def key(v: str):
        base, part, protocol, full = split_variant_name(v)
        return (VARIANT_ORDER.index(base) if base in VARIANT_ORDER else 99, base, part, protocol, full)
    return sorted(variants, key=key)


def _label(backbone: str, variant: str) -> str:
    b = BACKBONE_LABEL.get(backbone, backbone)
    base, part, protocol, full = split_variant_name(variant)
    label = VARIANT_LABEL.get(base, base).replace("{B}", b)
    if part:
        label += f", Step {part.removeprefix('step')} only"
    if full:
        label += ", evaluated with the full-prefix rationale"
    if protocol:
        label += f" [{protocol} protocol]"
    return label


def results_table(metrics: dict[str, Any], protocol: str) -> str:
    """Paper layout: one row per backbone x variant, mean ± std (%) over seeds, gain, p-value."""
    lines = [
        f"| model | seeds | " + " | ".join(c.upper() for c in COLS) + " | gain NDCG@10 vs best baseline | p (paired t) |",
        "|---|---|" + "---|" * len(COLS) + "---|---|",
    ]
    sig = metrics.get("significance", {})
    for bb, variants in metrics.get("results", {}).items():
        base = [v for v in ("id", "id_text") if v in variants and protocol in variants[v]["mean"]]
        best = max(base, key=lambda v: variants[v]["mean"][protocol]["ndcg@10"]) if base else None
        for var in _sorted_variants(variants):
            e = variants[var]
            if protocol not in e["mean"]:
                continue
            cells = [f"{100 * e['mean'][protocol][c]:.2f} ± {100 * e['std'][protocol][c]:.2f}" for c in COLS]
            gain, p = "", ""
            if best and var not in ("id", "id_text"):
                b = variants[best]["mean"][protocol]["ndcg@10"]
                if b > 0:
                    gain = f"{100 * (e['mean'][protocol]['ndcg@10'] - b) / b:+.1f}% vs {_label(bb, best)}"
                s = sig.get(bb, {}).get(var, {}).get(protocol)
                if s and s.get("p_ttest") is not None:
                    p = f"{s['p_ttest']:.3g}"
            lines.append(f"| {_label(bb, var)} | {len(e['seeds'])} | " + " | ".join(cells) + f" | {gain} | {p} |")
    rnd = (metrics.get("random") or {}).get(protocol)
    if rnd:
        lines.append("| random ranker (expected) | - | " + " | ".join(f"{100 * rnd[c]:.2f}" for c in COLS) + " | | |")
    return "\n".join(lines)


def paper_table(metrics: dict[str, Any]) -> str:
    ours = metrics.get("results", {}).get("sasrec", {})
    lines = ["| SASRec variant | paper Games NDCG@10 | paper Games HR@10 | ours NDCG@10 | ours HR@10 |",
             "|---|---|---|---|---|"]
    for var, ref in PAPER_GAMES_SASREC.items():
        o = ours.get(var, {}).get("mean", {}).get("sampled")
        on = f"{100 * o['ndcg@10']:.2f}" if o else "—"
        oh = f"{100 * o['hr@10']:.2f}" if o else "—"
        lines.append(f"| {_label('sasrec', var)} | {ref['ndcg@10']:.2f} | {ref['hr@10']:.2f} | {on} | {oh} |")
    return "\n".join(lines)


def cost_table(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    lines = ["| role | model | engine | rationales | prompt tokens | output tokens | s / rationale | output tok/s | est. $ (paper's gpt-3.5 prices) | all 3 steps | recommends seen items |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for role, s in (("teacher", teacher), ("student", student)):
        if not s:
            continue
        rows = s.get("generated_rows") or 0
        secs = s.get("generation_seconds") or 0
        out = s.get("output") or {}
        spr = f"{secs / rows:.2f}" if rows else "—"
        lines.append(
            f"| {role} | {_short_model(s.get('model_id') or s.get('model'))} | {s.get('engine')} | {rows} | "
            f"{s.get('prompt_tokens', 0):,} | {s.get('output_tokens', 0):,} | {spr} | "
            f"{s.get('output_tokens_per_s') or '—'} | {s.get('estimated_cost_usd', 0):.4f} | "
            f"{_pct(out.get('share_all_three_steps'))} | {_pct(out.get('share_recommending_seen_items'))} |"
        )
    lines.append(f"| paper | LLaMA2-7B student on 1×A100 / ChatGPT | | | | | "
                 f"{PAPER_COST['student_s_per_rationale_a100']} / {PAPER_COST['chatgpt_s_per_call']} | | | | |")
    return "\n".join(lines)


def _short_model(model_id: Optional[str]) -> Optional[str]:
    """A distilled model's id holds absolute folder paths (for lineage); a table needs the last two parts."""
    if not model_id:
        return model_id
    return re.sub(r"/(?:[^/#@:|]+/)+([^/#@:|]+/[^/#@:|]+)(?=#)", r"…/\1", model_id)


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def honest_paragraph(metrics: dict[str, Any], teacher: dict[str, Any], student: dict[str, Any],
                     distill: dict[str, Any]) -> str:
    """What these numbers can and cannot show, derived from the numbers themselves."""
    out = []
    for bb, variants in metrics.get("results", {}).items():
        prot = "sampled" if "sampled" in metrics.get("protocols", []) else "full"
        base = [v for v in ("id", "id_text") if v in variants]
        if not base or "slim:student" not in variants:
            continue
        best = max(base, key=lambda v: variants[v]["mean"][prot]["ndcg@10"])
        b = variants[best]["mean"][prot]["ndcg@10"]
        s = variants["slim:student"]["mean"][prot]["ndcg@10"]
        sig = metrics.get("significance", {}).get(bb, {}).get("slim:student", {}).get(prot, {})
        p = sig.get("p_ttest")
        verdict = "beats" if s > b else "does not beat"
        signif = "" if p is None else (f" (the difference is significant, paired t-test p = {p:.2g})" if p < 0.05
                                       else f" (the difference is not significant, paired t-test p = {p:.2g})")
        out.append(f"With {BACKBONE_LABEL.get(bb, bb)}, SLIM {verdict} the better baseline "
                   f"({_label(bb, best)}) on {prot} NDCG@10: {100 * s:.2f} vs {100 * b:.2f}{signif}.")
        full = variants.get("slim:student" + FULL_PREFIX_VARIANT)
        if full is not None:
            fs = full["mean"][prot]["ndcg@10"]
            sig_full = metrics.get("significance", {}).get(bb, {}).get("slim:student" + FULL_PREFIX_VARIANT, {})
            fp = sig_full.get(prot, {}).get("p_ttest")
            out.append(f"The same SLIM models given, at evaluation, a second rationale written from the whole "
                       f"training prefix score {100 * fs:.2f}"
                       + ("" if fp is None else f" (against {_label(bb, best)}: paired t-test p = {fp:.2g})") + ".")
        leaky = variants.get("slim:student@leaky")
        if leaky is not None:
            lk = leaky["mean"][prot]["ndcg@10"]
            out.append(f"Trained with the leaky protocol (the rationale fused also at the training positions "
                       f"whose targets it has read) the same SLIM scores {100 * lk:.2f}.")
    t_out = (teacher.get("output") or {})
    s_out = (student.get("output") or {})
    quality = []
    if t_out.get("share_all_three_steps") is not None:
        quality.append(f"{_pct(t_out['share_all_three_steps'])} of teacher answers contain all three steps and "
                       f"{_pct(t_out.get('share_recommending_seen_items'))} recommend an item the user has already seen")
    if s_out.get("share_all_three_steps") is not None:
        quality.append(f"for the student: {_pct(s_out['share_all_three_steps'])} and "
                       f"{_pct(s_out.get('share_recommending_seen_items'))}")
    if distill.get("eval_loss_before") is not None and distill.get("eval_loss_after") is not None:
        quality.append(f"distillation moved the student's held-out rationale loss from "
                       f"{distill['eval_loss_before']:.3f} to {distill['eval_loss_after']:.3f}")
    teacher_model = _short_model(teacher.get("model_id") or teacher.get("model")) or "an unnamed teacher"
    student_model = _short_model((distill.get("manifest") or {}).get("base_model")
                                 or student.get("model_id") or student.get("model")) or "an unnamed student"
    n_teacher = teacher.get("generated_rows")
    text = " ".join(out)
    text += (
        "\n\nRead these figures for what this run is, not as the paper's effect size. "
        f"The teacher here is `{teacher_model}` and the student `{student_model}`"
        + (" (" + "; ".join(quality) + ")" if quality else "")
        + (f". {n_teacher} users got teacher rationales (the paper: 1,000–2,000 from ChatGPT)" if n_teacher else "")
        + f", and the data has {metrics.get('num_users')} users. Small teachers and students reason weakly "
        "and repeat themselves, and rationale vectors from a small sentence encoder carry little beyond "
        "the categories already in the item text. Differences smaller than the standard deviations above "
        "should be read as ties. For the paper's setting, point the teacher at a strong model through "
        "the `openai` engine and use a 7B student with vLLM on GPUs (configs/paper.yaml)."
    )
    return text


def _plots(metrics: dict[str, Any], teacher, student, distill, rec_summary, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    for prot in metrics.get("protocols", []):
        results = metrics.get("results", {})
        fig, axes = plt.subplots(1, len(COLS), figsize=(5 * len(COLS), 4), squeeze=False)
        for ax, col in zip(axes[0], COLS):
            labels, means, stds, colors = [], [], [], []
            palette = plt.get_cmap("tab10")
            for bi, (bb, variants) in enumerate(results.items()):
                for var in _sorted_variants(variants):
                    e = variants[var]
                    if prot not in e["mean"]:
                        continue
                    labels.append(f"{BACKBONE_LABEL.get(bb, bb)}\n{var}")
                    means.append(100 * e["mean"][prot][col])
                    stds.append(100 * e["std"][prot][col])
                    colors.append(palette(VARIANT_ORDER.index(var) if var in VARIANT_ORDER else 9))
            x = np.arange(len(labels))
            ax.bar(x, means, yerr=stds, color=colors, capsize=3)
            rnd = (metrics.get("random") or {}).get(prot, {}).get(col)
            if rnd is not None:
                ax.axhline(100 * rnd, color="grey", ls="--", lw=1, label="random")
                ax.legend(fontsize=7)
            ax.set_xticks(x, labels, rotation=70, fontsize=7)
            ax.set_title(f"{col.upper()} ({prot}), mean ± std over seeds, %")
        fig.tight_layout()
        files.append(_save_png(fig, storage.join(out_dir, f"metrics_{prot}.png")))

    # Throughput: generation (output tokens/s), distillation (tokens/s), recommender epochs.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names, vals = [], []
    for role, s in (("teacher gen", teacher), ("student gen", student)):
        if s.get("output_tokens_per_s"):
            names.append(role), vals.append(s["output_tokens_per_s"])
    if distill.get("tokens_per_s"):
        names.append("distill train"), vals.append(distill["tokens_per_s"])
    axes[0].bar(names, vals, color=["tab:blue", "tab:orange", "tab:green"][: len(vals)])
    axes[0].set_title("LLM throughput (tokens/s)")
    epoch_s = []
    for bb, variants in metrics.get("results", {}).items():
        for var in _sorted_variants(variants):
            es = [v for v in variants[var].get("mean_epoch_seconds", []) if v]
            if es:
                epoch_s.append((f"{bb}\n{var}", float(np.mean(es))))
    if epoch_s:
        axes[1].bar([n for n, _ in epoch_s], [v for _, v in epoch_s], color="tab:purple")
        axes[1].tick_params(axis="x", rotation=70, labelsize=7)
    axes[1].set_title("recommender seconds / epoch")
    fig.tight_layout()
    files.append(_save_png(fig, storage.join(out_dir, "throughput.png")))
    return files


def _save_png(fig, uri: str) -> str:
    """Render a figure to PNG bytes and write them as one object (local path or URI)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def stage_outputs(lay) -> list[tuple[str, str]]:
    """(stage, output folder) in pipeline order, from the run layout alone (the report is a stage:
    it reads the other stages' outputs, never the stage table)."""
    return [("prepare", lay.prepared), ("teach", lay.rationales("teacher")), ("distill", lay.distill),
            ("reason", lay.rationales("student")), ("encode", lay.embeddings), ("train", lay.rec),
            ("evaluate", lay.eval), ("report", lay.report)]


def stage_times(lay) -> str:
    lines = ["| stage | seconds | output |", "|---|---|---|"]
    total = 0.0
    for name, out in stage_outputs(lay):
        s = _summary(out)
        if "seconds" in s:
            total += s["seconds"]
            lines.append(f"| {name} | {s['seconds']:.0f} | `{out[len(lay.root):].strip('/')}` |")
    lines.append(f"| **total** | **{total:.0f}** | |")
    return "\n".join(lines)


def distill_lines(distill: dict[str, Any], student: dict[str, Any]) -> list[str]:
    """The distillation paragraph, naming what this run used (from the manifests): the student's
    base model, LoRA or full fine-tune, the strategy (DeepSpeed ZeRO stage or DDP) and the engine
    the distilled student generated with."""
    base = (distill.get("manifest") or {}).get("base_model") or distill.get("base_model") or "an unnamed base model"
    method = distill.get("method")
    how = {"lora": "LoRA on", "full": "full fine-tune of"}.get(method, f"{method} on" if method else "fine-tune of")
    strategy = distill.get("strategy")
    if strategy == "deepspeed":
        zero = distill.get("zero_stage")
        strat = f"DeepSpeed ZeRO-{zero}" if zero is not None else "DeepSpeed"
    else:
        strat = {"ddp": "torch DDP"}.get(strategy, strategy or "an unnamed strategy")
    lines = [f"- student: {how} `{_short_model(base)}`, {strat} on {distill.get('num_workers')} workers, "
             f"{distill.get('steps')} steps"]
    if student.get("engine"):
        lines.append(f"- the distilled student wrote its rationales with the `{student['engine']}` engine "
                     f"(`{_short_model(student.get('model_id') or student.get('model'))}`)")
    lines += [f"- held-out rationale loss {_f(distill.get('eval_loss_before'))} → {_f(distill.get('eval_loss_after'))} "
              f"(perplexity {_f(distill.get('eval_ppl_before'))} → {_f(distill.get('eval_ppl_after'))})",
              f"- training throughput {_f(distill.get('tokens_per_s'))} tokens/s", ""]
    return lines


def build_report(run_dir: str, paper_reference: bool = True) -> dict[str, Any]:
    from slim_ray.layout import RunLayout

    lay = RunLayout(run_dir)
    metrics = _read_json(storage.join(lay.eval, "metrics.json"))
    if metrics is None:
        raise FileNotFoundError(f"{lay.eval}/metrics.json missing: run `slim-ray evaluate` first")
    teacher = _summary(lay.rationales("teacher"))
    student = _summary(lay.rationales("student"))
    distill = _summary(lay.distill)
    rec_summary = _summary(lay.rec)
    storage.makedirs(lay.report)
    plots = _plots(metrics, teacher, student, distill, rec_summary, lay.report)

    md = [f"# SLIM run report — `{lay.root}`", ""]
    md += [f"Data: {metrics.get('num_users')} users, {metrics.get('num_items')} items; leave-one-out test "
           f"target. Sampled protocol: the true item against {((metrics.get('sampled') or {}).get('num_negatives'))} "
           "negatives drawn once per user with a fixed seed (stored, identical for every model). Full "
           "protocol: all items not in the user's history. Metrics in %, mean ± std over seeds.", ""]
    for prot, title in (("sampled", "Sampled-100 (paper protocol)"), ("full", "Full ranking")):
        if prot in metrics.get("protocols", []):
            md += [f"## {title}", "", results_table(metrics, prot), "", f"![{prot}](metrics_{prot}.png)", ""]
    if paper_reference:
        md += ["## The paper's Amazon Games figures, for orientation only", "",
               "Different data set, teacher (ChatGPT) and student (LLaMA2-7B); not comparable in level.", "",
               paper_table(metrics), ""]
    md += ["## Cost of rationales", "", cost_table(teacher, student), ""]
    if distill:
        md += ["## Distillation", ""] + distill_lines(distill, student)
    md += ["## Stage wall times", "", stage_times(lay), "", "![throughput](throughput.png)", ""]
    md += ["## What these numbers can and cannot show", "", honest_paragraph(metrics, teacher, student, distill), ""]
    path = storage.join(lay.report, "report.md")
    storage.write_text(path, "\n".join(md))
    return {"report": path, "plots": plots}


def _f(x: Any) -> str:
    return "—" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def run_report(cfg) -> dict[str, Any]:
    """Stage function: write report.md + plots for cfg.run_dir."""
    return build_report(cfg.run_dir, cfg.report.paper_reference)
