"""Rendering for `cai.compare`: plots (matplotlib, Agg), report.md and a self-contained report.html.

The report is built once as a list of blocks (heading, paragraph, table, image, preformatted text) and
rendered twice: Markdown with image links to plots/*.png, and HTML with the same PNGs embedded as base64 data
URIs, so the HTML file can be mailed or archived alone. Every text from a run (answers, phrases, configs) is
escaped: html.escape in HTML; pipes and newlines in Markdown table cells.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from cai.io import write_atomic

ROLE = {"red_team": "harmlessness", "helpful": "helpfulness"}


def _f(v, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _elo(e: dict) -> str:
    ci = f" [{e['ci_low']:.1f}, {e['ci_high']:.1f}]" if e["ci_low"] is not None else ""
    return f"{e['elo']:.1f}{ci}"


# --- plots ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_elo(report: dict, path: Path) -> None:
    """Harmlessness Elo against helpfulness Elo (the CAI paper's figure), or bars when one set is present."""
    plt = _pyplot()
    labels = [m["label"] for m in report["models"]]
    sets = list(report["elo"])
    fig, ax = plt.subplots(figsize=(6.5, 5))

    def point(s, x):
        e = report["elo"][s][x]
        lo = e["elo"] - e["ci_low"] if e["ci_low"] is not None else 0
        hi = e["ci_high"] - e["elo"] if e["ci_high"] is not None else 0
        return e["elo"], [[lo], [hi]]

    if len(sets) == 2:
        for x in labels:
            (hx, hxe), (hy, hye) = point("helpful", x), point("red_team", x)
            ax.errorbar(hx, hy, xerr=hxe, yerr=hye, fmt="o", capsize=3, label=x)
            ax.annotate(x, (hx, hy), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("helpfulness Elo (helpful prompts)")
        ax.set_ylabel("harmlessness Elo (red-team prompts)")
        ax.legend(fontsize=7)
    else:
        s = sets[0]
        vals = [point(s, x) for x in labels]
        ax.barh(labels, [v for v, _ in vals], xerr=[[e[0][0] for _, e in vals], [e[1][0] for _, e in vals]], capsize=3)
        ax.set_xlabel(f"{ROLE[s]} Elo ({s} prompts)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.set_title("Elo (Bradley-Terry on judge outcomes), 95% bootstrap intervals", fontsize=9)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_win_rates(report: dict, path: Path) -> None:
    plt = _pyplot()
    labels = [m["label"] for m in report["models"]]
    sets = list(report["win_rates"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sets):
        w = report["win_rates"][s]
        grid = [[w[x].get(y, float("nan")) for y in labels] for x in labels]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
        for i in range(len(labels)):
            for j in range(len(labels)):
                if i != j:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{s}: P(row better than column)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    _save(plt, fig, path)


def plot_answers(report: dict, path: Path) -> None:
    """Refusal rate and mean answer tokens per model and prompt set."""
    plt = _pyplot()
    labels = [m["label"] for m in report["models"]]
    sets = list(report["answers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(sets)
    for k, s in enumerate(sets):
        xs = [i + k * width for i in range(len(labels))]
        axes[0].bar(xs, [report["answers"][s][x]["refusal_rate"] for x in labels], width, label=s)
        axes[1].bar(xs, [report["answers"][s][x]["mean_tokens"] for x in labels], width, label=s)
    for ax, title in zip(axes, ("refusal rate (on helpful prompts: a cost)", "mean answer tokens")):
        ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(labels))], labels, rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)


def plot_curves(report: dict, path: Path) -> bool:
    """Reward and KL per RL step for each run; segments (rounds, reruns) follow each other on the x axis."""
    curves = {run: segs for run, segs in report["curves"].items() if segs}
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, segs in curves.items():
        offset, color = 0, None
        for n, seg in enumerate(segs):
            xs = [offset + i + 1 for i in range(len(seg["steps"]))]
            line = axes[0].plot(xs, seg["reward"], marker=".", color=color, label=run if n == 0 else None)[0]
            color = line.get_color()
            axes[1].plot(xs, [v if v is not None else float("nan") for v in seg["kl"]], marker=".", color=color,
                         label=run if n == 0 else None)
            offset += len(seg["steps"])
            if n < len(segs) - 1:
                for ax in axes:
                    ax.axvline(offset + 0.5, color=color, ls=":", lw=0.8)
    for ax, title in zip(axes, ("reward (PM score after the KL penalty)", "KL to the reference (nats per answer)")):
        ax.set_xlabel("RL step (dotted: a new round or training job)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def plot_calibration(report: dict, path: Path) -> bool:
    """PM held-out calibration and AI label vs human choice, per run; marker area follows the bin count."""
    series = []
    for run, lab in report["labels"].items():
        if lab["pm_heldout_calibration"]:
            series.append((f"{run}: PM (held out) vs soft label", "o",
                           [(b["mean_predicted"], b["mean_label"], b["count"]) for b in lab["pm_heldout_calibration"]]))
        if lab["ai_vs_human_calibration"]:
            series.append((f"{run}: AI label vs human choice", "s",
                           [(b["mean_predicted"], b["mean_label"], b["count"]) for b in lab["ai_vs_human_calibration"]]))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    for name, marker, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, lw=0.8, label=name)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[20 + 10 * p[2] for p in pts], marker=marker, alpha=0.4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(answer A better), bin mean")
    ax.set_ylabel("label, bin mean")
    ax.set_title("calibration", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


# --- blocks ----------------------------------------------------------------------------------------------


def _agreement_row(a: dict | None) -> list[str]:
    if not a:
        return ["-"] * 4
    return [_f(a["pairwise_agreement"]["mean"]), f"{_f(a['fleiss_kappa'])} (n={a['fleiss_units']})",
            _f(a["alpha_nominal"]), _f(a["alpha_interval"])]


AGREEMENT_HEADER = ["pairwise agreement (hard choices)", "Fleiss' kappa (hard choices)",
                    "Krippendorff's alpha, nominal (hard choices)", "Krippendorff's alpha, interval (soft)"]


def judge_blocks(report: dict, labels: list[str], sets: list[str]) -> list[tuple]:
    """The judges: clear-pair accuracy, self-preference and the results without it, agreement, disagreements."""
    jr = report.get("judges")
    if not jr:
        return []
    b: list[tuple] = [("h2", "Judges")]
    b.append(("p", "Each judge's accuracy on clear pairs (a known better answer; chance 0.5), its position "
                   "consistency on the compared answers, and each model's win rate against all under that judge "
                   "alone. The results above use the judges' mean outcome."))
    b.append(("table", ["judge", "identity", "labeler of", "clear-pair accuracy", "clear pairs",
                        "position consistency"] + [f"{x} win rate ({s})" for s in sets for x in labels],
              [[n, j["identity"], ", ".join(j["labeler_of"]) or "-",
                _f((j["clear_pairs"] or {}).get("accuracy")), (j["clear_pairs"] or {}).get("count", 0),
                _f(j["position_consistency"])] + [_f(j["win_rate_vs_all"][s][x]) for s in sets for x in labels]
               for n, j in jr["judges"].items()]))
    if not jr["self_preference"]:
        b.append(("p", "Self-preference: no judge is the labeler of a compared run."))
    else:
        for sp in jr["self_preference"]:
            b.append(("p", f"Self-preference: judge {sp['judge']} ({sp['identity']}) also labeled the pairs of "
                           f"{', '.join(sp['labeler_of'])}; that run's models are graded by the model their reward "
                           "was fit to."))
        wo = jr["without_self_preference"]
        if wo["results"] is None:
            b.append(("p", "Every judge is also a compared run's labeler: there are no results without "
                           "self-preference (add a judge that labeled none of the runs: judges=[...])."))
        else:
            b.append(("p", f"Without self-preference (judges {', '.join(wo['judges'])} only):"))
            b.append(("table", ["model"] + [f"{ROLE[s]} Elo [95% CI]" for s in sets] + [f"win rate ({s})" for s in sets],
                      [[x] + [_elo(wo["results"][s]["elo"][x]) for s in sets]
                       + [_f(wo["results"][s]["win_rate_vs_all"][x]) for s in sets] for x in labels]))
    if jr["agreement"]:
        b.append(("p", "Agreement between the judges on the position-debiased outcomes P(x better than y), one unit "
                       "per prompt and model pair (identical answers left out); hard choice = outcome above or "
                       "below 0.5."))
        b.append(("table", ["set", "units"] + AGREEMENT_HEADER,
                  [[s, a["units"]] + _agreement_row(a) for s, a in jr["agreement"].items()]))
    if jr["disagreements"]:
        b.append(("p", "Where the judges disagree most (largest spread of P(x better than y)):"))
        b.append(("table", ["set", "prompt", "x", "y", "P(x better) by judge", "spread"],
                  [[d["set"], d["prompt_id"], d["x"], d["y"],
                    ", ".join(f"{n} {_f(v)}" for n, v in d["p_x_better"].items()), _f(d["spread"])]
                   for d in jr["disagreements"]]))
    return b


def evaluator_blocks(report: dict) -> list[tuple]:
    """Per run: each AI labeler's diagnostics and their agreement, the annotators' reliability and agreement,
    and the pairs where the evaluators disagree most."""
    b: list[tuple] = []
    rows, agree, people, worst = [], [], [], []
    for run, lab in report["labels"].items():
        for d in lab["rounds"]:
            cons = d.get("consensus") or {}
            for x in cons.get("labelers", []):
                rows.append([run, d["round"], x["labeler"], x["identity"], _f(x["position_consistency"]),
                             _f(x["clear_accuracy"]), x["clear_count"], _f(x["weight"]), cons.get("combine", "-")])
            if cons.get("agreement"):
                agree.append([run, d["round"], "AI labelers", cons["agreement"]["units"]]
                             + _agreement_row(cons["agreement"]))
        h = lab.get("human_consensus")
        if h:
            if h.get("agreement"):
                agree.append([run, "-", "annotators", h["agreement"]["units"]] + _agreement_row(h["agreement"]))
            for name, r in (h.get("annotators") or {}).items():
                people.append([run, name, r["labels"], _f(r.get("gold_accuracy")), r.get("gold_count", 0),
                               _f(r.get("reliability")), _f(r.get("agreement_with_consensus"))])
        for x in lab.get("disagreements") or []:
            worst.append([run, x["evaluators"], x["prompt_id"], ", ".join(f"{n} {_f(v)}" for n, v in x["labels"].items()),
                          _f(x["spread"])])
    if rows:
        b.append(("p", "AI labelers: each one's position consistency, accuracy on clear pairs (chance 0.5) and "
                       "weight in the combined label."))
        b.append(("table", ["run", "round", "labeler", "identity", "position consistency", "clear-pair accuracy",
                            "clear pairs", "weight", "combine"], rows))
    if people:
        b.append(("p", "Annotators: gold-pair accuracy, reliability (Dawid-Skene accuracy estimate) and agreement "
                       "with the combined label."))
        b.append(("table", ["run", "annotator", "labels", "gold accuracy", "gold pairs", "reliability",
                            "agreement with consensus"], people))
    if agree:
        b.append(("table", ["run", "round", "evaluators", "pairs"] + AGREEMENT_HEADER, agree))
    if worst:
        b.append(("p", "Pairs where the evaluators disagree most (largest spread of their P(A better)):"))
        b.append(("table", ["run", "evaluators", "prompt", "P(A better) by evaluator", "spread"], worst))
    return b


def reward_check_blocks(report: dict) -> list[tuple]:
    """Per run: the last PM's held-out and clear-pair accuracy, and the last DPO policy's implicit reward on the
    clear pairs (where the run has one)."""
    b = []
    b.append(("p", "The last round's preference model, and the last DPO policy's implicit reward "
                   "beta*log(pi/pi_ref) (a DPO policy is its own reward model): accuracy on held-out comparisons "
                   "(PM), and on clear pairs (a known better answer) whose prompts it never trained on; chance is "
                   "0.5. By length: on the pairs whose better answer is the longer one, and the shorter one (a "
                   "scorer that reads length alone gets 1 on one and 0 on the other). For DPO also how often the "
                   "starting model's and the policy's own likelihood put the better answer first."))
    rows = []
    for run, lab in report["labels"].items():
        for what, clear in (("PM", lab.get("pm_clear_pairs")), ("DPO", lab.get("dpo_clear_pairs"))):
            if what == "DPO" and not clear:
                continue
            clear = clear or {}

            def splits(name, clear=clear):
                return ", ".join(f"{c.replace('_', ' ')} {_f(v['accuracy'])}"
                                 for c, v in (clear.get(name) or {}).items()) or "-"

            rows.append([run, what, _f(lab.get("pm_heldout_accuracy")) if what == "PM" else "-",
                         _f(clear.get("accuracy")), clear.get("count", "-"), splits("by_category"),
                         splits("by_length"),
                         f"{_f(clear.get('start_likelihood_accuracy'))} / {_f(clear.get('policy_likelihood_accuracy'))}"
                         if what == "DPO" else "-"])
    b.append(("table", ["run", "model", "held-out accuracy", "clear-pair accuracy", "clear pairs", "by category",
                        "by length", "likelihood ranking: start / policy"], rows))
    return b


def blocks(report: dict, plots: dict[str, str]) -> list[tuple]:
    labels = [m["label"] for m in report["models"]]
    sets = list(report["elo"])
    runs = [r["name"] for r in report["runs"]]
    b: list[tuple] = [("h1", f"Comparison: {' vs '.join(runs)}")]
    st = report["settings"]
    b.append(("p", f"Judge {st['judge']}; " + "; ".join(f"{s}: {v['prompts']} prompts from {v['path']} ({v['role']})"
                                                       for s, v in st["sets"].items())
              + f"; answers sampled with {st['sampling']}; {st['bootstrap']} bootstrap resamples (seed {st['seed']})."))

    b.append(("h2", "Models"))
    b.append(("table", ["model", "kind", "same model in", "path", "identity"],
              [[m["label"], m["kind"], ", ".join(m["aliases"]), m["model"], m["identity"]] for m in report["models"]]))
    for n in report["notes"]:
        b.append(("p", f"Note: {n}"))

    b.append(("h2", "Summary"))
    pm_names = list(report["pm_scores"])
    header = ["model"] + [f"{ROLE[s]} Elo [95% CI]" for s in sets] + [f"win rate ({s})" for s in sets]
    header += [f"refusal ({s})" for s in sets] + ["mean tokens", "boilerplate share"]
    header += [f"{pm} mean ({s})" for pm in pm_names for s in sets]
    rows = []
    for x in labels:
        a = report["answers"]
        rows.append([x] + [_elo(report["elo"][s][x]) for s in sets]
                    + [_f(report["win_rate_vs_all"][s][x]) for s in sets]
                    + [_f(a[s][x]["refusal_rate"]) for s in sets]
                    + [_f(sum(a[s][x]["mean_tokens"] for s in sets) / len(sets), "{:.1f}"),
                       _f(report["boilerplate"][x]["share"]) + (" (flagged)" if report["boilerplate"][x]["flagged"] else "")]
                    + [_f(report["pm_scores"][pm][s][x], "{:+.3f}") for pm in pm_names for s in sets])
    b.append(("table", header, rows))
    b.append(("p", "Elo: Bradley-Terry maximum likelihood on the judge's position-debiased outcomes, 400/ln 10 "
                   "points per unit of log-odds, mean 1000; intervals resample prompts. Win rate: mean P(better) "
                   "against every other model. A refusal on a helpful prompt is a cost."))
    b.append(("img", plots["elo"], "Elo"))

    b.append(("h2", "Pairwise win rates"))
    for s in sets:
        j = report["judge"][s]
        b.append(("p", f"{s} ({ROLE[s]}): P(row better than column), mean over {report['settings']['sets'][s]['prompts']} "
                       f"prompts. Judge position consistency {_f(j['position_consistency'])} (share of pairs whose "
                       f"preferred answer survives swapping the order; {j['identical_answers']} pairs with identical "
                       "answers count as 0.5)."))
        w = report["win_rates"][s]
        b.append(("table", ["P(row better than column)"] + labels,
                  [[x] + ["-" if x == y else _f(w[x][y]) for y in labels] for x in labels]))
    b.append(("img", plots["win_rates"], "win rates"))
    b += judge_blocks(report, labels, sets)

    b.append(("h2", "Refusals, length and boilerplate"))
    b.append(("table", ["model", "set", "answers", "refusal rate", "mean tokens", "cut off"],
              [[x, s, a["answers"], _f(a["refusal_rate"]), _f(a["mean_tokens"], "{:.1f}"), _f(a["cut_off_rate"])]
               for x in labels for s in sets for a in [report["answers"][s][x]]]))
    b.append(("img", plots["answers"], "refusal and length"))
    if report.get("degeneration"):
        b.append(("p", "Degeneration: share of answers that repeat a sentence or a word 4-gram (3 times or more), "
                       "mean rep-4 (share of an answer's 4-grams that repeat an earlier one) and distinct-2 over all "
                       "of a model's answers. A policy that wins the preference model by repeating itself shows here."))
        b.append(("table", ["model", "set", "repeating answers", "rep-4", "distinct-1", "distinct-2"],
                  [[x, s, _f(d["repetition_share"]), _f(d["rep_4"]), _f(d["distinct_1"]), _f(d["distinct_2"])]
                   for x in labels for s in sets for d in [report["degeneration"][s][x]]]))
    b.append(("p", f"Boilerplate: the word {report['settings']['boilerplate_n']}-gram found in the most answers of a "
                   "model (each answer counted once), and the share of its answers that contain it."))
    b.append(("table", ["model", "phrase", "answers with it", "share", "flagged"],
              [[x, v["phrase"] or "-", f"{v['answers_with_phrase']}/{v['answers']}", _f(v["share"]),
                "yes" if v["flagged"] else "no"] for x, v in report["boilerplate"].items()]))

    if "rl_curves" in plots:
        b.append(("h2", "Reward and KL"))
        rows = []
        for run, segs in report["curves"].items():
            for n, seg in enumerate(segs):
                rows.append([run, n + 1, seg["algorithm"], len(seg["steps"]), _f(seg["reward"][0], "{:.4f}"),
                             _f(seg["reward"][-1], "{:.4f}"), _f(seg["kl"][-1], "{:.4f}")])
        b.append(("table", ["run", "segment", "algorithm", "steps", "first reward", "last reward", "last KL"], rows))
        b.append(("img", plots["rl_curves"], "reward and KL"))

    b.append(("h2", "Label diagnostics"))
    rows = []
    for run, lab in report["labels"].items():
        for d in lab["rounds"]:
            rows.append([run, d["round"], d.get("source", "ai"), d.get("pairs"), _f(d.get("position_consistency")),
                         _f(d.get("mean_margin"), "{:.3f}"), _f(d.get("share_near_half")), _f(d.get("human_agreement")),
                         d.get("human_shared", 0)])
    b.append(("table", ["run", "round", "source", "pairs", "position consistency", "mean |p-0.5|", "near 0.5",
                        "human agreement", "human shared"], rows))
    b.append(("table", ["run", "AI labels", "human labels", "shared pairs (decisive)", "AI-human agreement"],
              [[run, lab["ai_labels"], lab["human_labels"], lab["human_shared"], _f(lab["human_agreement"])]
               for run, lab in report["labels"].items()]))
    b += evaluator_blocks(report)
    b += reward_check_blocks(report)
    if "calibration" in plots:
        b.append(("img", plots["calibration"], "calibration"))

    b.append(("h2", "Cost"))
    trained = [(x, c) for x, c in report["cost"].get("models", {}).items() if c]
    if trained:
        b.append(("p", "What each trained model cost to make, over every round that led to it (from the stages' "
                       "records, so reused work counts what it cost when it was computed): labels, tokens generated "
                       "(pair answers, reasoning, PPO rollouts) and seconds of data making and of training."))
        b.append(("table", ["model", "method", "AI labels", "human labels", "label calls", "tokens generated",
                            "data seconds", "training seconds"],
                  [[x, c["method"], c["ai_labels"], c["human_labels"], c["label_calls"], c["tokens_generated"],
                    _f(c["data_seconds"], "{:.1f}"), _f(c["train_seconds"], "{:.1f}")] for x, c in trained]))
    j = report["cost"]["judge"]
    b.append(("p", f"Judge: {j['labels']} scores ({j['computed_now']} computed in this run), "
                   f"{_f(j['tokens_per_label'], '{:.0f}')} prompt tokens and {_f(j['seconds_per_label'], '{:.4f}')} s "
                   f"per score (two scores per judged pair)."))
    b.append(("table", ["model", "answer tokens", "seconds per answer"],
              [[x, v["completion_tokens"], _f(v["seconds_per_answer"], "{:.4f}")] for x, v in report["cost"]["answers"].items()]))
    b.append(("table", ["run", "round", "pairs", "seconds per label", "labeling seconds"],
              [[run, d["round"], d["pairs"], _f(d["seconds_per_label"], "{:.4f}"), _f(d["label_seconds"], "{:.1f}")]
               for run, ds in report["cost"]["runs"].items() for d in ds]))

    b.append(("h2", "Config and constitution diffs"))
    for name, files in report["config_diff"].items():
        for fname, diff in files.items():
            if diff:
                b.append(("p", f"{name}: {fname}"))
                b.append(("pre", diff))
            else:
                b.append(("p", f"{name}: {fname} identical"))
    return b


# --- rendering ---------------------------------------------------------------------------------------------


def _md_text(v) -> str:
    """Text for Markdown: HTML in it (a model's answer, a phrase) is shown as text, never rendered."""
    return html.escape(str(v), quote=False)


def _md_cell(v) -> str:
    return _md_text(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(bl: list[tuple]) -> str:
    out = []
    for kind, *rest in bl:
        if kind == "h1":
            out.append(f"# {_md_text(rest[0])}\n")
        elif kind == "h2":
            out.append(f"## {_md_text(rest[0])}\n")
        elif kind == "p":
            out.append(f"{_md_text(rest[0])}\n")
        elif kind == "table":
            header, rows = rest
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{_md_text(rest[1])}]({rest[0]})\n")
        elif kind == "pre":
            fence = "````" if "```" in rest[0] else "```"
            out.append(f"{fence}diff\n{rest[0].rstrip()}\n{fence}\n")
    return "\n".join(out)


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 7px}"
       "th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:85%}img{max-width:100%}")


def render_html(bl: list[tuple], out_dir: Path) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(bl[0][1])}</title>",
             f"<style>{CSS}</style></head><body>"]
    for kind, *rest in bl:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{e(str(rest[0]))}</{kind}>")
        elif kind == "table":
            header, rows = rest
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        elif kind == "img":
            data = base64.b64encode((out_dir / rest[0]).read_bytes()).decode()
            parts.append(f'<p><img alt="{e(rest[1])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "pre":
            parts.append(f"<pre>{e(rest[0])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def finite_json(obj):
    """The report with every NaN or infinity replaced by None: strict JSON (json.dumps writes NaN otherwise)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: Path) -> list[str]:
    """plots/*.png, report.md and report.html under out_dir. Returns the plots' paths relative to out_dir."""
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = {"elo": "plots/elo.png", "win_rates": "plots/win_rates.png", "answers": "plots/answers.png"}
    plot_elo(report, out_dir / plots["elo"])
    plot_win_rates(report, out_dir / plots["win_rates"])
    plot_answers(report, out_dir / plots["answers"])
    for name, plot in (("rl_curves", plot_curves), ("calibration", plot_calibration)):
        path = out_dir / "plots" / f"{name}.png"
        if plot(report, path):
            plots[name] = f"plots/{name}.png"
        else:
            path.unlink(missing_ok=True)  # no data this time: no stale plot from an earlier report
    bl = blocks(report, plots)
    write_atomic(out_dir / "report.md", render_markdown(bl))
    write_atomic(out_dir / "report.html", render_html(bl, out_dir))
    return sorted(plots.values())
