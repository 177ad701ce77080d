"""How each KV-compression policy trades KV for answers, on the same cases, in the same engine,
beside kvpress on Hugging Face transformers.

    python benchmarks/bench_fidelity.py --jobs 2 --out /tmp/fidelity   # ~2 h on 2 cores

Cases (``needles.make_cases``): needle-in-a-haystack (one key, four keys, one key with three
values) and variable tracking (a chain of assignments among a distractor chain; RULER's ``vt``),
over the packaged public-domain texts, at 2K, 4K and 8K tokens (SmolLM2 has 8192 positions: the
"8K" cases are 8000 tokens), ``--cases`` of each kind per length: a point of the plot is every
case, ``3 x 2 x --cases`` (24 by default; the table splits them by kind). Small samples,
labelled so.

vLLM (SmolLM2-135M-Instruct, the embedded default model; greedy, 48 new tokens):

- ``full``: vLLM's own CPU backend, the reference;
- per kept fraction, one engine with policy ``snapkv`` (every head in compressed pools), whose
  requests ask for ``streamingllm``, ``snapkv``, ``pyramidkv`` and ``duo`` at that fraction
  through ``vllm_xargs`` -- the per-request control the server offers;
- per head profile (``--profiles``: the shipped one and the sparse one), one engine with policy
  ``heterocache``, whose requests ask for ``heterocache`` and ``duo`` at each fraction.

A fraction at or below a policy's share of full heads (F / H of its roles) is infeasible and is
reported so. kvpress (``--kvpress``): its presses of the same methods on HF transformers, in a
virtual environment of its own that the script creates (``kvpress_env.py``), against its own
full-cache answers.

Shared context (``--shared-context``): several questions about one long text per length
(``needles.make_shared_cases``), asked one after another so that later ones hit vLLM's prefix
cache for the whole text; every vLLM engine above runs twice, with prefix caching on and off,
and ``shared-context.md`` says, per policy and fraction, how many answers are the same both
ways (they must all be), how many prompt tokens came from the cache, and the accuracy.

    python benchmarks/bench_fidelity.py --shared-context --jobs 2 --out /tmp/fidelity-shared

Each engine and each kvpress setting is a process of its own; ``--jobs N`` runs N of them at
once, each pinned to one core. The report resumes: a process whose answers are in ``--out`` for
the same settings and cases is not run again (so a report can grow a fraction or a policy).
Written to ``--out``: ``results.json`` (every answer), ``table.md`` (accuracy per task kind,
agreement with the full cache's answer, fraction kept) and ``fidelity.png`` (the same, against
the fraction kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

POLICY_ENGINE = ("streamingllm", "snapkv", "pyramidkv", "duo")  # served per request by a snapkv server
PROFILE_ENGINE = ("heterocache", "duo")  # served per request by a heterocache server, per profile


def correct(text: str, case: dict) -> bool:
    """Every answer in the text and no distractor (variable tracking names the other chain's)."""
    return all(a in text for a in case["answers"]) and not any(a in text for a in case.get("absent", ()))


@dataclasses.dataclass(frozen=True)
class Run:
    """One process of the report: a vLLM engine serving ``settings`` (``_fidelity_worker.py``) or one
    kvpress setting (``_kvpress_worker.py``). Its answers are cached in ``--out`` under ``tag`` with
    what they were made from (``key``): a run whose key is unchanged is not run again."""

    tag: str
    argv: tuple[str, ...]  # the interpreter, the worker and its arguments
    key: str
    seconds: float  # a rough estimate on one core, so that the longest runs start first


def vllm_run(model: str, cases_file: Path, server: dict | None, settings: list[dict], work: Path, tag: str,
             prefix_caching: bool | None = None) -> Run:
    """``prefix_caching``: None, the cases at once without it; else with it on or off, the cases
    one after another (``_fidelity_worker.py``)."""
    if prefix_caching is not None:
        tag += "+pc" if prefix_caching else "-pc"
    run_file = work / f"{tag}.settings.json"
    run = {"server": server, "settings": settings}
    if prefix_caching is not None:
        run["prefix_caching"] = prefix_caching
    key = json.dumps({**run, "cases": _digest(cases_file)})
    run_file.write_text(key)
    return Run(tag, (sys.executable, str(HERE / "_fidelity_worker.py"), model, str(cases_file), str(run_file),
                     str(work / f"{tag}.json")), key, ENGINE_START_S + len(settings) * SETTING_S)


def kvpress_run(python: Path, model: str, cases_file: Path, setting: dict, work: Path) -> Run:
    key = json.dumps({"setting": setting, "cases": _digest(cases_file)})
    return Run(setting["name"], (str(python), str(HERE / "_kvpress_worker.py"), model, str(cases_file),
                                 json.dumps(setting), str(work / f"{setting['name']}.json")), key, KVPRESS_SETTING_S)


# Rough seconds on one core of the 2-core dev machine for the default 24 cases: only the order uses them.
ENGINE_START_S, SETTING_S, KVPRESS_SETTING_S = 60, 400, 500


def execute(runs: list[Run], work: Path, jobs: int) -> dict[str, dict]:
    """Every run's answers, by tag: cached ones read back, the others run ``jobs`` at a time, each
    pinned to a core of its own when ``jobs`` > 1 (vLLM's ``VLLM_CPU_OMP_THREADS_BIND``, ``taskset``
    and one OpenMP thread), longest first."""
    cores: queue.Queue[int] = queue.Queue()
    for core in range(jobs):
        cores.put(core)

    def one(run: Run) -> dict:
        out, stamp = work / f"{run.tag}.json", work / f"{run.tag}.run"
        if out.exists() and stamp.exists() and stamp.read_text() == run.key:
            print(f"[fidelity] {run.tag}: reusing {out}", flush=True)
            return json.loads(out.read_text())
        out.unlink(missing_ok=True)
        core = cores.get()
        try:
            env, argv = dict(os.environ), list(run.argv)
            if jobs > 1:
                env.update(VLLM_CPU_OMP_THREADS_BIND=str(core), OMP_NUM_THREADS="1")
                argv = ["taskset", "-c", str(core), *argv]
            t = time.time()
            print(f"[fidelity] {run.tag}: running" + (f" on core {core}" if jobs > 1 else ""), flush=True)
            subprocess.run(argv, check=True, env=env)
            print(f"[fidelity] {run.tag}: {time.time() - t:.0f} s", flush=True)
        finally:
            cores.put(core)
        stamp.write_text(run.key)
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        ordered = sorted(runs, key=lambda r: -r.seconds)
        return dict(zip((r.tag for r in ordered), pool.map(one, ordered)))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def floors(profile) -> dict[str, float]:
    """Policy -> the fraction its full heads alone keep with ``profile`` (a ratio must exceed it)."""
    from vllm_heterocache.policies import POLICIES, full_share

    return {name: full_share(policy.roles(profile)) for name, policy in POLICIES.items()}


def vllm_runs(model, cases_file, fractions, profiles, work, shipped_profile,
              profile_policies=PROFILE_ENGINE, prefix_caching: bool | None = None) -> tuple[list[Run], list[dict]]:
    """vLLM's own backend, the policy engine (one per fraction, so that they can run side by side)
    and the per-profile engines (module docstring); with the settings found infeasible."""
    runs = [vllm_run(model, cases_file, None, [{"name": "full", "policy": "full", "ratio": 1.0}], work, "stock",
                     prefix_caching)]
    infeasible = []

    def engine(server: dict, policies: tuple[str, ...], fs: list[float], profile_name: str, suffix: str,
               tag: str) -> None:
        limits = floors(shipped_profile(profile_name))
        settings = []
        for policy in policies:
            for f in fs:
                s = {"name": f"{policy}{suffix}@{f}", "policy": policy, "ratio": f, "label": policy + suffix}
                (settings if f > limits[policy] else infeasible).append(s)
        if settings:
            runs.append(vllm_run(model, cases_file, server, settings, work, tag, prefix_caching))

    for f in fractions:
        engine({"policy": "snapkv", "compression_ratio": f, "profile": profiles[0]}, POLICY_ENGINE, [f],
               profiles[0], "", f"policies@{f}")
    for n, name in enumerate(profiles):
        suffix = "" if n == 0 else f" ({name.removeprefix('SmolLM2-135M-Instruct-') or name} profile)"
        limits = floors(shipped_profile(name))
        ratio = max(f for f in [*fractions, 0.9] if f > limits["heterocache"])
        policies = ("heterocache",) if n == 0 else profile_policies  # (duo with the first profile ran above)
        engine({"policy": "heterocache", "compression_ratio": ratio, "profile": name}, policies, fractions, name,
               suffix, f"heterocache-{n}")
    return runs, infeasible


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,4096,8000", help="prompt lengths in tokens")
    p.add_argument("--cases", type=int, default=4, help="cases of each task kind per length (default 4)")
    p.add_argument("--tasks", default="needle,vartrack", help="task kinds (needles.KINDS)")
    p.add_argument("--fractions", default="0.5,0.4,0.25,0.1", help="fractions of the KV cache kept")
    p.add_argument("--profiles", default="SmolLM2-135M-Instruct,SmolLM2-135M-Instruct-sparse",
                   help="shipped head profiles (names) for heterocache and duo")
    p.add_argument("--profile-policies", default=",".join(PROFILE_ENGINE),
                   help="policies run with the other profiles (default heterocache,duo)")
    p.add_argument("--kvpress", default="streamingllm,snapkv,pyramidkv",
                   help="kvpress presses to run on HF transformers ('' for none)")
    p.add_argument("--kvpress-fractions", help="fractions for kvpress (default: --fractions; HF is slower)")
    p.add_argument("--kvpress-env", type=Path, help="kvpress's virtual environment (default: kvpress_env.py's)")
    p.add_argument("--engines", default="vllm,kvpress", help="which to run: vllm, kvpress (default both; a run "
                   "of one can go beside a run of the other, each with its own --out)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one core each (default 1: one run, "
                   "threads as its engine sets them)")
    p.add_argument("--shared-context", action="store_true",
                   help="the shared-context check instead (module docstring): task kind shared, vLLM engines with "
                        "prefix caching on and off")
    p.add_argument("--out", type=Path, default=Path("/tmp/heterocache-fidelity"))
    a = p.parse_args()
    if a.shared_context:
        a.tasks, a.engines = "shared", "vllm"
    if not 1 <= a.jobs <= len(os.sched_getaffinity(0)):
        p.error(f"--jobs {a.jobs}: this process may use {len(os.sched_getaffinity(0))} cores; one run per core")
    from transformers import AutoTokenizer

    from needles import make_cases

    from vllm_heterocache.models.smollm2 import prepare_default_model
    from vllm_heterocache.head_profile import load_profile
    from vllm_heterocache.head_profile.resolve import shipped_profile_path

    def shipped_profile(name: str):
        return load_profile(shipped_profile_path(name))

    model = str(prepare_default_model())
    tok = AutoTokenizer.from_pretrained(model)
    contexts = {int(c): a.cases for c in a.contexts.split(",")}
    cases = [c.__dict__ for c in make_cases(tok, contexts, tasks=tuple(a.tasks.split(",")))]
    fractions = [float(f) for f in a.fractions.split(",")]
    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases))
    rows: list[dict] = []  # one per (engine, label, fraction)

    def add(engine: str, label: str, fraction: float | None, kept: list[float] | None, texts: list[str] | None,
            reference: list[str] | None) -> None:
        rows.append({"engine": engine, "policy": label, "fraction": fraction, "kept": kept, "texts": texts,
                     "correct": None if texts is None else [correct(t, c) for t, c in zip(texts, cases)],
                     "agrees": None if texts is None else [t.strip() == r.strip() for t, r in zip(texts, reference)]})

    engines = set(a.engines.split(","))
    vllm, infeasible, kvpress_settings, kvpress = [], [], [], []
    if a.shared_context:
        pairs = [vllm_runs(model, cases_file, fractions, a.profiles.split(","), work, shipped_profile,
                           tuple(a.profile_policies.split(",")), caching)[0] for caching in (True, False)]
        done = execute(pairs[0] + pairs[1], work, a.jobs)
        table = render_shared_context(pairs, done, cases)
        (a.out / "shared-context.md").write_text(table)
        print(table)
        print(f"[fidelity] wrote {a.out}/shared-context.md")
        return
    if "vllm" in engines:
        vllm, infeasible = vllm_runs(model, cases_file, fractions, a.profiles.split(","), work, shipped_profile,
                                     tuple(a.profile_policies.split(",")))
    presses = [x for x in a.kvpress.split(",") if x]
    if "kvpress" in engines and presses:
        from kvpress_env import ensure_env

        python = ensure_env(a.kvpress_env)
        kvpress_settings = [{"name": "kvpress-full"}] + [
            {"name": f"kvpress-{press}@{f}", "press": press, "kept_fraction": f}
            for press in presses for f in [float(x) for x in (a.kvpress_fractions or a.fractions).split(",")]]
        kvpress = [kvpress_run(python, model, cases_file, s, work) for s in kvpress_settings]
    done = execute(vllm + kvpress, work, a.jobs)

    if vllm:
        reference = done["stock"]["results"][0]["answers"]
        for run in vllm:
            for r in done[run.tag]["results"]:
                s = r["setting"]
                add("vllm", s.get("label", "full"), s["ratio"], r["kept"], r["answers"], reference)
        for s in infeasible:
            add("vllm", s["label"], s["ratio"], None, None, None)
    if kvpress_settings:
        kv_reference = [x["text"] for x in done["kvpress-full"]["answers"]]
        for s in kvpress_settings:
            r = done[s["name"]]
            add("kvpress", s.get("press", "full"), s.get("kept_fraction", 1.0), [r["kept_fraction"]] * len(cases),
                [x["text"] for x in r["answers"]], kv_reference)

    (a.out / "results.json").write_text(json.dumps({"cases": [{k: v for k, v in c.items() if k != "prompt_ids"}
                                                               for c in cases], "rows": rows}, indent=1))
    rows.sort(key=lambda r: (r["engine"] != "vllm", r["policy"] != "full", r["policy"], -r["fraction"]))
    kinds = sorted({c["kind"] for c in cases})
    table = render_table(rows, cases, kinds)
    (a.out / "table.md").write_text(table)
    draw_plot(rows, cases, kinds, a.out / "fidelity.png")
    print(table)
    print(f"[fidelity] wrote {a.out}/table.md, results.json, fidelity.png")


def _share(values: list) -> float:
    """The mean (of flags: the share that is true)."""
    return sum(values) / len(values) if values else float("nan")


def _by_kind(row: dict, cases: list[dict], kind: str) -> list[bool]:
    return [ok for ok, c in zip(row["correct"], cases) if c["kind"] == kind]


def render_shared_context(pairs: list[list[Run]], done: dict[str, dict], cases: list[dict]) -> str:
    """Per engine setting: answers with prefix caching on equal to those with it off, prompt
    tokens from the cache, accuracy both ways."""
    head = ["engine", "policy", "fraction", f"same answers (n={len(cases)})", "prompt tokens from the cache",
            "accuracy on", "accuracy off"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = same = 0
    for on, off in zip(*pairs):
        for r_on, r_off in zip(done[on.tag]["results"], done[off.tag]["results"]):
            s = r_on["setting"]
            equal = sum(x.strip() == y.strip() for x, y in zip(r_on["answers"], r_off["answers"]))
            total, same = total + len(cases), same + equal
            cached = sum(r_on["cached_tokens"]) / sum(len(c["prompt_ids"]) for c in cases)
            lines.append("| " + " | ".join([
                on.tag.removesuffix("+pc"), s.get("label", s["policy"]), f"{s['ratio']}", f"{equal}",
                f"{cached:.2f}", f"{_share([correct(t, c) for t, c in zip(r_on['answers'], cases)]):.2f}",
                f"{_share([correct(t, c) for t, c in zip(r_off['answers'], cases)]):.2f}"]) + " |")
    contexts = sorted({c["context"] for c in cases})
    note = (f"\n{len(cases)} questions: {len(cases) // len(contexts)} about each of {len(contexts)} texts "
            f"({', '.join(map(str, contexts))} tokens), asked one after another. Same answers: {same} of {total}.\n")
    return "\n".join(lines) + "\n" + note


def render_table(rows: list[dict], cases: list[dict], kinds: list[str]) -> str:
    per = {k: sum(c["kind"] == k for c in cases) for k in kinds}
    lengths = sorted({c["context"] for c in cases})
    head = ["engine", "policy", "target kept", "kept", f"accuracy (n={len(cases)})"] + [
        f"{k} (n={per[k]})" for k in kinds] + [f"agrees with full (n={len(cases)})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["texts"] is None:
            cells = [r["engine"], r["policy"], f"{r['fraction']}", "infeasible"] + ["—"] * (len(kinds) + 2)
        else:
            cells = [r["engine"], r["policy"], f"{r['fraction']}", f"{_share(r['kept']):.3f}"]
            cells.append(f"{_share(r['correct']):.2f}")
            cells += [f"{_share(_by_kind(r, cases, k)):.2f}" for k in kinds]
            cells.append(f"{_share(r['agrees']):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nSmall samples: {', '.join(f'{per[k]} {k} cases' for k in kinds)} per point "
            f"({len(lengths)} lengths: {', '.join(map(str, lengths))} tokens); one case moves an accuracy by "
            f"{1 / min(per.values()):.3f}. Agreement: the answer equals the same engine's full-cache answer.\n")
    return "\n".join(lines) + "\n" + note


# Plot: one panel per task kind (accuracy) and one for agreement with the full cache, against
# the fraction kept; vLLM's policies solid, kvpress's dashed, in the same colour per method.
COLOURS = {"full": (0, 0, 0), "streamingllm": (31, 119, 180), "snapkv": (255, 127, 14), "pyramidkv": (44, 160, 44),
           "duo": (148, 103, 189), "heterocache": (214, 39, 40)}
_W, _H, _PAD = 360, 300, 52


def _colour(label: str) -> tuple[int, int, int]:
    base = COLOURS.get(label.split(" ")[0], (120, 120, 120))
    return tuple(int(c * 0.55) for c in base) if "(" in label else base  # other profiles: darker


def draw_plot(rows: list[dict], cases: list[dict], kinds: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()

    panels = [(f"accuracy ({' + '.join(kinds)})", lambda r: _share(r["correct"])),
              ("agreement with the full cache's answer", lambda r: _share(r["agrees"]))]
    series: dict[tuple[str, str], list[tuple[float, list]]] = {}
    for r in rows:
        if r["texts"] is not None:
            series.setdefault((r["engine"], r["policy"]), []).append((_share(r["kept"]), r))
    legend_h = 18 * (len(series) // 3 + 2)
    img = Image.new("RGB", (_W * len(panels), _H + legend_h + 30), "white")
    d = ImageDraw.Draw(img)
    small, big = font(11), font(13)
    d.text((8, 6), f"SmolLM2-135M-Instruct: answers vs fraction of the KV cache kept "
                   f"({len(cases)} cases; small samples)", fill="black", font=big)
    for n, (title, metric) in enumerate(panels):
        x0, y0 = n * _W + _PAD, 30 + 24
        w, h = _W - _PAD - 16, _H - 24 - _PAD
        d.text((x0, y0 - 18), title, fill="black", font=big)

        def at(x, y):
            return x0 + x * w, y0 + (1 - y) * h

        for t in (0, 0.25, 0.5, 0.75, 1.0):
            d.text((x0 - 30, at(0, t)[1] - 6), f"{t:.2f}", fill="black", font=small)
            d.text((at(t, 0)[0] - 10, y0 + h + 4), f"{t:.2f}", fill="black", font=small)
            d.line([at(0, t), at(1, t)], fill=(230, 230, 230))
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        for (engine, label), points in series.items():  # the full cache: a level to compare with
            if label == "full":
                level = at(0, metric(points[0][1]))[1]
                for k in range(0, 40, 2):
                    d.line([(x0 + w * k / 40, level), (x0 + w * (k + 1) / 40, level)],
                           fill=(90, 90, 90) if engine == "vllm" else (170, 170, 170), width=1)
        d.text((x0 + w / 2 - 30, y0 + h + 18), "fraction kept", fill="black", font=small)
        for (engine, label), points in series.items():
            pts = sorted((x, metric(r)) for x, r in points)
            xy = [at(x, y) for x, y in pts]
            colour = _colour(label)
            for (a, b) in zip(xy, xy[1:]):
                if engine == "kvpress":  # dashed
                    for k in range(0, 10, 2):
                        d.line([(a[0] + (b[0] - a[0]) * k / 10, a[1] + (b[1] - a[1]) * k / 10),
                                (a[0] + (b[0] - a[0]) * (k + 1) / 10, a[1] + (b[1] - a[1]) * (k + 1) / 10)],
                               fill=colour, width=2)
                else:
                    d.line([a, b], fill=colour, width=2)
            for x, y in xy:
                box = [x - 3, y - 3, x + 3, y + 3]
                d.rectangle(box, outline=colour) if engine == "kvpress" else d.ellipse(box, fill=colour)
    for i, (engine, label) in enumerate(series):
        x, y = 10 + (i % 3) * (_W * len(panels) // 3), _H + 34 + 18 * (i // 3)
        colour = _colour(label)
        d.line([(x, y + 6), (x + 24, y + 6)], fill=colour, width=3)
        d.text((x + 30, y), f"{label} ({'vLLM' if engine == 'vllm' else 'kvpress on HF, dashed'})", fill="black",
               font=small)
    img.save(path)


if __name__ == "__main__":
    main()
