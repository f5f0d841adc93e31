"""stage=sl: red-team prompts -> initial answers -> R critique/revision rounds -> SFT data -> SL-CAI model.

Outputs go to <runs_dir>/<run>/: config.sl.yaml (resolved), constitution.yaml (+ sha), sl/steps.jsonl (every
generated text, keyed), sl/chains.jsonl, sl/sft.jsonl, sl/model/, metrics.jsonl (see cai.runs).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cai.backends import backend_for, check_backend, release, sampling_from_config
from cai.config import parse_shard, to_yaml
from cai.constitution import load_constitution
from cai.critique import ChainSettings, generate_chains, sft_examples
from cai.errors import CaiError
from cai.human import load_demonstrations, page_demonstrations
from cai.io import table, write_atomic, write_jsonl_atomic
from cai.launch import is_main, launched, on_main
from cai.models import resolve_model
from cai.pair_sources import (
    ContrastSettings,
    continuation,
    contrast_requests,
    generate_by_length,
    join_opener,
    load_contrast_context,
)
from cai.prompts import load_few_shot, load_prompts
from cai.records import sft_example
from cai.runs import RunLock, in_shard, run_dir_for, start_run
from cai.store import JsonlStore
from cai.templates import load_template
from cai.train.common import reuse_or_train
from cai.train.sft import sft_training_key, train_sft


def merge_shards(store: JsonlStore, shards_dir: Path) -> int:
    """Append every shard's records to the run's store; keys already present are skipped, so merging is exact
    and can be repeated. Returns how many records were added."""
    before = len(store)
    for path in sorted(shards_dir.glob("*/steps.jsonl")):
        store.append(list(JsonlStore(path).records.values()))
    added = len(store) - before
    if added:
        print(f"merged {added} records from {shards_dir}")
    return added


def run_sl(cfg) -> dict:
    sampling = sampling_from_config(cfg.sampling, "sampling")
    # read and check every input before anything is written
    constitution = load_constitution(cfg.constitution)
    demonstrations = []
    if cfg.source != "revisions":  # a file's demonstrations, then the labeling page's better answers
        demonstrations = load_demonstrations(cfg.human_demonstrations) if cfg.human_demonstrations else []
        keys = {d["key"] for d in demonstrations}
        demonstrations += [d for d in page_demonstrations(run_dir_for(cfg)) if d["key"] not in keys]
        if not demonstrations:
            raise CaiError(f"source={cfg.source} needs human demonstrations: human_demonstrations=FILE (JSONL/CSV "
                           f"with prompt, answer), or better answers from the labeling page "
                           f"(python -m cai.label run={cfg.run})")
    # source=human: the human answers are the SFT data, nothing is generated
    red_team = load_prompts(cfg.red_team) if cfg.source != "human" else []
    helpful_all = load_prompts(cfg.helpful) if cfg.source != "human" else []
    few_shot = load_few_shot(cfg.critique.few_shot_file, cfg.critique.few_shot)
    crit_t, rev_t = load_template(cfg.critique.critique_template), load_template(cfg.critique.revision_template)
    n_red_examples = len(red_team) * ({"all": max(cfg.critique.rounds, 1), "final+contrast": 2}.get(cfg.sft.data, 1))
    helpful_wanted = math.ceil(cfg.sft.helpful_ratio * n_red_examples)
    helpful = helpful_all[: min(len(helpful_all), helpful_wanted)]
    distill = None
    if cfg.sft.data in ("contrast", "final+contrast"):  # context distillation: the positive side of a context
        distill = ContrastSettings({"red_team": load_contrast_context(cfg.sft.contrast_context, cfg.sft.contrast_shots)},
                                   "construction", 1.0)

    run_dir = run_dir_for(cfg)
    sl_dir = run_dir / "sl"
    shard = parse_shard(cfg.shard)
    if shard:  # this process generates its share only, into its own store, under its own lock
        red_team = [p for p in red_team if in_shard(p.prompt, *shard)]
        helpful = [p for p in helpful if in_shard(p.prompt, *shard)]
    if shard and launched():
        raise CaiError(f"shard={cfg.shard}: each shard is its own process (one command per shard); run shards "
                       "without accelerate launch")
    check_backend(cfg.generator, "generator")
    work_dir = sl_dir / "shards" / f"{shard[0]}-of-{shard[1]}" if shard else sl_dir
    with RunLock(work_dir if shard else run_dir):  # launched: the main process holds it for all (cai.launch)
        work_dir.mkdir(parents=True, exist_ok=True)
        metrics = start_run(work_dir if shard else run_dir, cfg, constitution)
        started = time.time()

        def generate_data():  # launched: the main process only; the others wait for its files
            backend = backend_for(cfg.generator, progress=False)  # the stage shows one bar per wave instead
            settings = ChainSettings(seed=cfg.seed, rounds=cfg.critique.rounds, critique_template=crit_t,
                                     revision_template=rev_t, few_shot=few_shot, sampling=sampling,
                                     model_identity=backend.identity)
            store = JsonlStore(work_dir / "steps.jsonl")
            if not shard:
                merge_shards(store, sl_dir / "shards")
            # sft.data=contrast with no critique rounds uses no chain: skip the red-team answers nobody reads
            chained = [] if cfg.sft.data == "contrast" and cfg.critique.rounds == 0 else red_team
            result = generate_chains(chained, helpful, constitution, settings, backend, store, work_dir / "plans",
                                     cfg.generator.batch_size, progress=cfg.progress)
            distilled = []
            if distill is not None:
                positives = [pos for pos, _ in contrast_requests(red_team, {}, constitution, distill,
                                                                 backend.identity, sampling, cfg.seed)]
                result.waves["contrast"] = generate_by_length(positives, store, backend, sampling, work_dir / "plans",
                                                              cfg.generator.batch_size, cfg.progress, "contrast")
                for p, r in zip(red_team, positives):
                    text = join_opener(r.meta["opener"], continuation(store, r))
                    if text.strip():
                        distilled.append(sft_example(r.key, "contrast", p.id, 0, p.prompt, text))
            if shard:
                done = {"shard": cfg.shard, "prompts": len(red_team), "helpful": len(helpful),
                        "generated": sum(w.generated for w in result.waves.values()),
                        "reused": sum(w.reused for w in result.waves.values()),
                        "seconds": round(time.time() - started, 1)}
                write_atomic(work_dir / "summary.json", json.dumps(done, indent=1))
                print(f"\nshard {cfg.shard}: {done['prompts']} red-team and {done['helpful']} helpful prompts, "
                      f"{done['generated']} texts generated, {done['reused']} reused, {done['seconds']} s; "
                      f"run without shard= to merge, build the SFT data and train\n")
                return done
            write_jsonl_atomic(sl_dir / "chains.jsonl", result.chains)
            revisions = {"final": "final", "all": "all", "final+contrast": "final"}.get(cfg.sft.data, "none")
            initial = cfg.sft.method == "crlft" and cfg.sft.crlft.rewards.get("initial", 0) > 0
            examples = sft_examples(result.chains, result.helpful, revisions, initial) + distilled + demonstrations
            if cfg.train and not examples:
                raise CaiError("no SFT example: every revision and helpful answer is empty (or there are no "
                               "prompts); the generated records are kept in sl/steps.jsonl")
            write_jsonl_atomic(sl_dir / "sft.jsonl", examples)
            gen_seconds = time.time() - started
            totals = {k: sum(getattr(w, k) for w in result.waves.values())
                      for k in ("generated", "reused", "prompt_tokens", "completion_tokens", "seconds")}
            metrics.log({"sl/generate/texts_generated": totals["generated"],
                         "sl/generate/texts_reused": totals["reused"],
                         "sl/generate/completion_tokens": totals["completion_tokens"],
                         "sl/generate/tokens_per_s": totals["completion_tokens"] / max(totals["seconds"], 1e-9),
                         "sl/generate/chains_reused": result.chains_reused,
                         "sl/generate/chains_regenerated": result.chains_regenerated,
                         "sl/generate/rounds_reused": result.rounds_reused,
                         "sl/generate/rounds_regenerated": result.rounds_regenerated})
            release(backend)  # free the generator's memory (vLLM: its GPU engine) before training
            return result, examples, totals, gen_seconds

        data = on_main(generate_data)
        if shard:
            return data
        result, examples, totals, gen_seconds = data if is_main() else (None,) * 4

        train_summary = None
        model_dir = sl_dir / "model"
        if cfg.train:
            base = resolve_model(cfg.generator.model)
            key = sft_training_key(sl_dir / "sft.jsonl", base, cfg.sft, cfg.seed)

            def train():  # launched: every process trains, the main one saves
                card = ""
                if is_main():
                    counts = {s: sum(e["source"] == s for e in examples)
                              for s in ("revision", "contrast", "helpful", "human", "initial")}
                    card = model_card(cfg, constitution, counts, len(result.chains))
                return train_sft(sl_dir / "sft.jsonl", base, cfg, model_dir, sl_dir / "checkpoints", metrics, card,
                                 key, device=cfg.generator.device, progress=cfg.progress)

            train_summary = reuse_or_train(model_dir, key, train)
        if not is_main():
            return {"train": train_summary}
        summary = {
            "run": str(run_dir), "constitution": f"{constitution.name} ({constitution.sha[:12]})",
            "prompts": len(red_team), "helpful": len(helpful), "helpful_wanted": helpful_wanted,
            "rounds": cfg.critique.rounds,
            "chains_reused": result.chains_reused, "chains_regenerated": result.chains_regenerated,
            "rounds_reused": result.rounds_reused, "rounds_regenerated": result.rounds_regenerated,
            "sft_examples": len(examples), "generation_seconds": round(gen_seconds, 1), **totals,
            "train": train_summary, "seconds": round(time.time() - started, 1),
        }
        write_atomic(sl_dir / "summary.json", json.dumps(summary, indent=1))
        print_sl_summary(summary, result)
        return summary


def model_card(cfg, constitution, counts: dict, n_chains: int) -> str:
    return "\n".join([
        "# SL-CAI model", "",
        f"Fine-tuned from `{cfg.generator.model}` by `cai` (stage=sl) on critique/revision data "
        "(Bai et al. 2022, Constitutional AI, section 3).", "",
        f"- constitution: `{constitution.name}` version {constitution.version}, sha256 `{constitution.sha}`",
        f"- red-team chains: {n_chains}, critique/revision rounds: {cfg.critique.rounds}",
        f"- SFT examples: {counts['revision']} revisions ({cfg.sft.data}), {counts['contrast']} answers under the "
        f"positive contrast context (context distillation), {counts['helpful']} helpful answers, "
        f"{counts['human']} human demonstrations" + (f", {counts['initial']} initial answers" if counts["initial"]
                                                     else ""),
        *([f"- C-RLFT (OpenChat): each source is a condition in the system turn ({cfg.sft.crlft.condition_template}) "
           f"and its reward weights its loss: {cfg.sft.crlft.rewards}; the chat template answers under the best "
           "source's condition (cai_train.json: crlft)"] if cfg.sft.method == "crlft" else []),
        f"- seed: {cfg.seed}", "", "## Config", "", "```yaml", to_yaml(cfg).rstrip(), "```", "",
    ])


def print_sl_summary(summary: dict, result) -> None:
    rows = [(label, w.generated, w.reused, w.completion_tokens, f"{w.seconds:.1f}",
             f"{w.completion_tokens / w.seconds:.1f}" if w.seconds else "-") for label, w in result.waves.items()]
    print("\nSL-CAI generation")
    print(table(rows, ("wave", "generated", "reused", "tokens", "seconds", "tok/s")))
    print(f"\nchains: {summary['chains_regenerated']} regenerated, {summary['chains_reused']} reused; "
          f"rounds: {summary['rounds_regenerated']} regenerated, {summary['rounds_reused']} reused")
    print(f"SFT examples: {summary['sft_examples']}  (prompts {summary['prompts']}, helpful {summary['helpful']}, "
          f"rounds {summary['rounds']})")
    if summary["helpful"] < summary.get("helpful_wanted", 0):
        print(f"note: sft.helpful_ratio asked for {summary['helpful_wanted']} helpful examples, but the helpful set "
              f"has only {summary['helpful']}; the mix has fewer helpful examples than asked for")
    t = summary["train"]
    if t:
        how = "reused (same data and settings)" if t.get("reused") else f"{t['steps']} steps in {t['seconds']} s"
        print(f"SFT: {how}, train loss {t['train_loss']:.4f}")
        if t.get("crlft"):
            c = t["crlft"]
            print("C-RLFT: " + ", ".join(f"{s} {v['examples']} examples x weight {v['weight']:.3f}"
                                         for s, v in c["sources"].items())
                  + f"; the model answers under {c['generate_with']!r}: {c['condition']!r}")
    print(f"run: {summary['run']}  total {summary['seconds']} s\n")
