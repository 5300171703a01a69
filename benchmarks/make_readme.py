"""Write ``benchmarks/README.md`` and the generated blocks of the other docs from the committed results.

    python -m benchmarks.make_readme            # rewrite benchmarks/README.md and every generated block in place
    python -m refdecoder.tools.check_docs       # fail when any of them differs from what this would write

Every figure of the benchmark records comes from a JSON file in ``benchmarks/results/`` (or ``recipes/results/``)
named beside its table, so a figure changes in one place: re-run the benchmark, commit its JSON, run this. A block
of another Markdown file is generated when it sits between ``<!-- generated: NAME -->`` and
``<!-- end generated -->``; :data:`BLOCKS` maps each NAME to the function that writes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks import quality_small_table
from benchmarks.quality.names import with_current_names

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
GENERATED = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


@cache
def result(name: str) -> dict[str, Any]:
    """A committed result file, by its name under ``benchmarks/results`` or a path from the repository root.

    Quality variants recorded under their earlier names are shown under the current ones (``names.py``)."""
    path = ROOT / name if "/" in name else RESULTS / name
    return with_current_names(json.loads(path.read_text()))


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def gain(doc: dict[str, Any], model: str, group: str = "motion", key: str = "psnr") -> str:
    """A variant's gain over its baseline in dB, as the quality tables print it (``+1.28``)."""
    pair = next(k for k in doc["gains"] if k.startswith(model + " - "))
    return f"{doc['gains'][pair][group][key]:+.2f}"


# --- blocks of README.md and docs/ ----------------------------------------------------------------------------


def headline_block() -> str:
    """README: the default quality run's motion table, with the command that makes it."""
    doc = result("quality_small.json")
    minutes = doc["timing"]["total_s"] / 60
    return (
        f"```bash\npython benchmarks/quality_small.py            # CPU, {minutes:.0f} min on the recorded 2-core run\n"
        "python benchmarks/quality_small_table.py benchmarks/results/quality_small.json --group motion\n```\n\n"
        f"{quality_small_table.table(doc, 'motion')}\n\n"
        f"Held-out clips with motion, reference = frame 0, PSNR in dB (gains over the plain decoder fine-tuned on the "
        f"same budget in brackets). The headline `{doc['headline']}` has the settings of the `small-local` "
        "preset (radius 2 with the locality prior, per-stage space-to-depth tokenizers, no token dropout) at the "
        f"`tiny` size{_correspondence_note(doc)}. Static clips, photos, the shift probe, ablations and timing: "
        "[benchmarks/README.md](benchmarks/README.md).\n"
    )


def _correspondence_note(doc: dict[str, Any]) -> str:
    """``, with correspondence-guided ...`` when the run's headline variant turns correspondence on."""
    variants = doc["settings"]["finetune"]["variants"]
    if isinstance(variants, list):  # runs recorded before variants became typed diffs
        variants = {v["name"]: v for v in variants}
    variant = variants.get(doc["headline"], {})
    on = variant.get("set", {}).get("correspondence.enabled", False)
    return ", with correspondence-guided reference attention (`config.correspondence`)" if on else ""


def shift_probe_table(probes: list[dict[str, Any]]) -> str:
    """Shift probes (``shift_probe()`` results): frame-0 gain (whole / shared columns) per model, mode and shift."""
    labels = {"default": "estimated / in place", "true_displacements": "true shift given"}
    rows, shifts = [], []
    for probe in probes:
        for model, modes in probe["models"].items():
            shifts = modes["shift_tokens"]
            for mode, label in labels.items():
                if mode in modes:
                    gains = zip(modes[mode]["gain_frame0"], modes[mode]["gain_frame0_shared"])
                    rows.append([model, label] + [f"{w:+.2f} / {c:+.2f}" for w, c in gains])
    return table(["model", "displacements"] + [f"{k:+g}" for k in shifts], rows)


def backbones_block() -> str:
    """README: the registered adapters, from the registry itself."""
    from refdecoder.backbones.registry import get_backbone, list_backbones

    rows = []
    for name in list_backbones():
        adapter = get_backbone(name)
        rule = adapter.frame_rule
        vae = re.search(r"``(\w+)``|:class:`~?[\w.]*?(\w+)`", adapter.__doc__ or "")
        vae_class = f"`{vae.group(1) or vae.group(2)}`" if vae else "-"
        streams = "yes" if adapter.exact_streaming else "no (its own temporal layout)"
        tiles = "yes" if adapter.tiling else "no"
        rows.append([f"`{name}`", vae_class, f"{rule.first} + {rule.step}k", streams, tiles])
    head = ["backbone", "VAE", "pixel frames", "streams window by window", "tiled decode"]
    return table(head, rows) + "\n"


def tiny_demo_block() -> str:
    """docs/training.md: what README command 1 printed (``recipes/results/tiny_demo.json``)."""
    record = result("recipes/results/tiny_demo.json")
    row = record["comparison"][0]
    size = f"{row['frames']:.0f} frames {row['height']:.0f}x{row['width']:.0f}"
    lines = []
    for prefix, label in (("base_", "VAE (no fine-tuning)"), ("baseline_", "baseline (plain decoder, same budget)")):
        cells = [f"{row[prefix + k]:.2f}" for k in ("psnr", "psnr_reference", "psnr_others")]
        lines.append([label, *cells, f"{row[prefix + 'ssim']:.3f}"])
    cells = [f"{row[k]:.2f}" for k in ("psnr", "psnr_reference", "psnr_others")]
    lines.append(["RefDecoder", *cells, f"{row['ssim']:.3f}"])
    minutes = f"{record['seconds'] // 60:.0f} min {record['seconds'] % 60:.0f} s"
    head = [f"held-out `{row['name']}`, {size}", "PSNR all", "reference frame", "other frames", "SSIM"]
    return (
        f"`{record['command']}`, {record['where']}: {minutes} in all "
        f"(`recipes/results/tiny_demo.json`).\n\n{table(head, lines)}\n\n"
        f"The RefDecoder gains {row['gain_psnr_reference']:+.2f} dB on the reference frame over the baseline.\n"
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "headline": headline_block,
    "backbones": backbones_block,
    "tiny-demo": tiny_demo_block,
}


def fill_blocks(text: str) -> str:
    """``text`` with every generated block rewritten; an unknown block name raises KeyError naming it."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {sorted(BLOCKS)}")
        return match.group(1) + BLOCKS[name]() + match.group(4)

    return GENERATED.sub(fill, text)


# --- benchmarks/README.md ---------------------------------------------------------------------------------------


def _tflop(entry: dict[str, Any], plain: float) -> str:
    return f"{entry['tflop']:.1f} T ({entry['tflop'] / plain:.2f}x)"


def decode_overhead() -> str:
    doc = result("decode_overhead.json")
    rows = []
    for grid, values in doc["flops"].items():
        plain = values["plain_decoder_tflop"]
        small, paper = _tflop(values["small"], plain), _tflop(values["paper"], plain)
        rows.append([f"FLOPs, {grid}", f"{plain:.1f} T", small, paper])
    medians = doc["wall_time"]["median_s"]
    rows.append(
        [
            "CPU wall time, latents " + "x".join(map(str, doc["wall_time"]["latent_shape"])) + " (median)",
            f"{medians['vae.decode']:.1f} s",
            f"{medians['small']:.1f} s ({medians['small'] / medians['vae.decode']:.2f}x)",
            f"{medians['paper']:.1f} s ({medians['paper'] / medians['vae.decode']:.2f}x)",
        ]
    )
    memory = [f"{m['device']} {m['size'][0]}x{m['size'][1]}: {m['ratio_21_over_5']:.3f}x" for m in doc["memory"]]
    added = doc["flops"]["17f_480x832"]
    wan22 = doc["wan22_flops"]["17f_704x1280"]
    wan22_rows = [
        [name, f"{v['tflop']:.1f} T ({v['ratio_to_plain']:.3f}x)", f"{v['added_params_m']:.0f} M"]
        for name, v in wan22.items()
        if isinstance(v, dict)
    ]
    return f"""## Decode overhead

`python benchmarks/decode_overhead.py` (`decode_overhead.json`): Wan2.1 config, random weights, FLOPs counted with
`FlopCounterMode` on the meta device.

{table(["measure", "plain Wan2.1 decode", "`small`", "`paper`"], rows)}

Added parameters: `small` {added["small"]["added_params_m"]:.1f} M, `paper` {added["paper"]["added_params_m"]:.1f} M.
Peak live memory, 21 against 5 latent frames (window 5): {"; ".join(memory)}. The plain decode through refdecoder's
windowed loop took {doc["wall_time"]["ratio_to_vae_decode"]["plain_windowed_loop"]:.2f}x `vae.decode`. The CPU
times were taken while other jobs shared the machine (`runs_s` in the JSON holds every round).

Wan2.2 at its TI2V-5B default, 17 frames 704x1280 (plain decoder {wan22["plain_decoder_tflop"]:.1f} T;
`small_even_grid` is `small` with `stages.patch_multipliers = (1, 1, 1)`):

{table(["preset", "TFLOP", "added parameters"], wan22_rows)}

{_video_backbones()}
"""


def _video_backbones() -> str:
    doc = result("decode_overhead_backbones.json")
    rows = []
    for name, v in doc["video_backbone_flops"].items():
        plain = v["plain_decoder_tflop"]
        memory = doc["video_backbone_memory"]["backbones"].get(name, {})
        ratio = next(
            (f"{v:.2f}x ({k[6:].replace('_over_', ' / ')})" for k, v in memory.items() if k.startswith("ratio_")), "-"
        )
        size = f"{v['frames']} x {v['size'][0]}x{v['size'][1]}"
        rows.append([name, size, f"{plain:.1f} T", _tflop(v["small"], plain), _tflop(v["paper"], plain), ratio])
    head = ["backbone", "frames x size", "plain", "`small`", "`paper`", "`small` memory, long / short latent frames"]
    intro = "Other video backbones at their released configs (`decode_overhead_backbones.json`):"
    return f"{intro}\n\n{table(head, rows)}"


def train_step() -> str:
    doc = result("train_step.json")
    cpu = doc["cpu_step"]
    s = doc["settings"]
    rows = [
        ["CPU step time"]
        + [f"{cpu['plain']['step_s']:.2f} s"]
        + [f"{cpu[k]['step_s']:.2f} s ({cpu[k]['time_ratio_to_plain']:.2f}x)" for k in ("tiny", "small")],
        ["weights + AdamW + peak live memory"]
        + [f"{cpu['plain']['peak_total_mb']:.0f} MiB"]
        + [f"{cpu[k]['memory_ratio_to_plain']:.2f}x" for k in ("tiny", "small")],
    ]
    big = doc["paper_size"]["17f_480x832"]
    rows.append(["training FLOPs, 17 x 480 x 832", f"{big['plain']['tflop']:.1f} T"])
    rows[-1] += [f"{big[k]['tflop_ratio_to_plain']:.2f}x" for k in ("tiny", "small")]
    for kind in ("efficient", "math"):
        key = f"memory_gb_{kind}_attention"
        rows.append([f"memory, 17 x 480 x 832, {kind} attention", f"{big['plain'][key]:.1f} GiB"])
        rows[-1] += [f"{big[k][key + '_ratio_to_plain']:.2f}x" for k in ("tiny", "small")]
    return f"""## Training step

`python benchmarks/train_step.py --threads 1 --repeats 5` (`train_step.json`): one step = frozen encode, decode, L1,
backward, AdamW; {s["frames"]} frames {s["size"]}x{s["size"]}, batch {s["batch"]}, {s["threads"]} thread, median of
{s["repeats"]} interleaved steps; the 17 x 480 x 832 rows are counted on the meta device.

{table(["measure", "plain decoder fine-tune", "`tiny`", "`small`"], rows)}
"""


def attention_scope() -> str:
    doc = result("attention_scope.json")
    flops = result("attention_scope_flops.json")["small_flops_17f_480x832"]
    rows = []
    for scope in ("global", "radius 0", "radius 2", "radius 4", "radius 2, video 0"):
        peaks = [doc["memory"][heads]["peak_bytes"].get(scope) for heads in ("4x64", "8x128")]
        memory = " / ".join(f"{p / 2**20:.1f}" for p in peaks) if all(peaks) else "-"
        f = flops[scope]
        rows.append(
            [
                scope,
                f"{doc['seconds'][scope]:.2f}",
                f"{doc['seconds'][scope + ' + bias']:.2f}",
                memory,
                f"{f['tflop']:.1f} T ({f['ratio_to_plain']:.3f}x)",
            ]
        )
    head = ["scope", "forward (CPU s)", "with locality bias", "attention peak MiB, 4x64 / 8x128", "`small` FLOPs"]
    return f"""## Attention scopes

`python benchmarks/attention_scope.py --repeats 3 --threads 1` (`attention_scope.json`; FLOPs from
`--flops-only`, `attention_scope_flops.json`). Time: {doc["time_model"]}, token grid {doc["time_grid"]}. Memory: one
attention call at grid {doc["memory_grid"]}, meta device (the dense mask a local scope replaces:
{doc["dense_mask_bytes"] / 2**20:.0f} MiB). FLOPs: `small`, 17 x 480 x 832, plain decoder
{flops["plain_decoder_tflop"]:.1f} T.

{table(head, rows)}

{dense_crossover()}
"""


def dense_crossover() -> str:
    """Dense against gathered local attention on small CPU grids: where ``DENSE_TOKENS`` comes from."""
    doc = result("attention_scope_crossover.json")
    shapes = sorted({(row["batch"], row["heads"]) for row in doc["rows"]})
    grids = sorted({(row["tokens"], tuple(row["grid"])) for row in doc["rows"]})
    ratio = {(row["batch"], row["heads"], tuple(row["grid"])): row["gather_s"] / row["dense_s"] for row in doc["rows"]}
    rows = [[f"{tokens} {list(grid)}", *(f"{ratio[(b, h, grid)]:.2f}" for b, h in shapes)] for tokens, grid in grids]
    head = ["tokens [grid]", *(f"batch {b} x {h} heads" for b, h in shapes)]
    return f"""Dense or gathered, on CPU: `python benchmarks/attention_scope.py --dense-crossover --threads 1`
(`attention_scope_crossover.json`): {doc["attention"]}, gather seconds over dense seconds (below 1: the gather is
faster), median of {doc["repeats"]} interleaved rounds, deterministic algorithms. `scoped_attention` runs a local scope
dense on CPU up to `DENSE_TOKENS` tokens (while its logits fit in `DENSE_BYTES`), gathered beyond.

{table(head, rows)}"""


def data_throughput() -> str:
    doc = result("data_throughput.json")
    rows = [[x["workers"], f"{x['clips_per_s']:.2f}", f"{x['first_batch_s']:.2f}"] for x in doc["loader"]]
    step = doc["training_step"]
    return f"""## Data throughput

`python benchmarks/data_throughput.py` (`data_throughput.json`): clips of {doc["clip"]["frames"]} frames, batch
{doc["clip"]["batch"]}, against a `{step["preset"]}` training step on `{step["backbone"]}`
({step["clips_per_s"]:.3f} clips/s).

{table(["loader workers", "clips/s", "first batch (s)"], rows)}
"""


def gpu_decode() -> str:
    text = (RESULTS / "gpu_decode_dry_run.md").read_text().strip()
    return f"""## GPU decode

`python benchmarks/gpu_decode.py` measures bf16 decodes, compile and a training step on one CUDA GPU; it has not
run on a GPU yet, so there are no GPU figures. `python benchmarks/gpu_decode.py --dry-run` (a default test) runs
the same code on CPU at toy sizes; its table (`gpu_decode_dry_run.md`, written with `gpu_decode_dry_run.json`)
shows that every row runs, not GPU speed:

{text}
"""


def quality() -> str:
    doc = result("quality_small.json")
    timing = doc["timing"]
    minutes = {k: timing[k] / 60 for k in ("data_s", "pretrain_s", "finetune_s", "eval_s", "total_s") if k in timing}
    # A run that starts from the shipped pretrained VAE (benchmarks/assets/quality_small_vae) has no pretraining.
    shipped = "the shipped pretrained VAE"
    cpu = f" on {doc['machine']['cpu_model']}" if doc["machine"].get("cpu_model") else ""  # recorded since b9f6c50
    workers = doc["settings"]["workers"]
    pretraining = f"pretraining {minutes['pretrain_s']:.1f}" if "pretrain_s" in minutes else shipped
    # Part timings are recorded since the fine-tune encodes side by side: the clips' latents, then the training.
    encoding = f" (encoding the clips {timing['finetune_encode_s'] / 60:.1f})" if "finetune_encode_s" in timing else ""
    targets = [
        [key, f"{v['value']:+.2f}", f"{v['target']:+.2f}", "met" if v["met"] else "NOT met"]
        for key, v in doc["targets"].items()
        if isinstance(v, dict)
    ]
    groups = ("motion", "motion/camera", "static", "photos")
    tables = "\n\n".join(quality_small_table.table(doc, group) for group in groups)
    return f"""## Small-scale quality

`python benchmarks/quality_small.py` (settings `recipes/configs/quality_small.yaml`; `--quick` runs the same
pipeline at toy sizes; `quality_small.json`, tables by `python benchmarks/quality_small_table.py
benchmarks/results/quality_small.json --group motion`). A reduced-width Wan2.1 VAE is pretrained as a plain
autoencoder on real videos and photographs, then each variant is fine-tuned from it on the same clips in the same
order, and all are evaluated on held-out clips with frame 0 as the reference: *static* (natural clips with little
motion), *motion* (natural motion and rendered camera moves) and *photos* (camera moves over held-out
photographs). Gains over the plain decoder fine-tuned on the same clips are in brackets. The run is deterministic
on one machine (a test compares saved weights byte for byte); across machines it is not bit-identical.

Default run (headline `{doc["headline"]}`): {minutes["total_s"]:.1f} min in all (data {minutes["data_s"]:.1f},
{pretraining}, fine-tuning {minutes["finetune_s"]:.1f}{encoding}, evaluation
{minutes["eval_s"]:.1f}), {timing["threads"]} thread per process, {workers} processes side by side{cpu}.

{tables}

Targets of the headline (`targets` in the JSON, limits from `eval.targets` of the recipe; `--retarget FILE.json`
judges a finished run against changed limits; `shift_follow_*` are fractions of the in-place frame-0 gain, over
whole frames and, `*_shown`, over the columns the displaced reference shows):

{table(["target", "measured", "limit", ""], targets)}
{shift_probe_section(doc)}"""


def shift_probe_section(doc: dict[str, Any]) -> str:
    if not doc["eval"].get("shift_probe"):
        return ""
    probe = doc["eval"]["shift_probe"]
    crop = "x".join(str(v) for v in probe["crop"])
    return f"""
Shift probe of the default run (`eval.shift_probe`, `benchmarks/quality/shift_probe.py`): {probe["clips"]} natural
held-out clips at {crop} px decoded with their frame 0 shifted sideways by k tokens ({probe["token_pixels"]} px) as
the reference; frame-0 PSNR gain in dB over an unrelated reference, whole frame / the columns the shifted reference
shows. "estimated / in place": the model's own decode; "true shift given": the shift passed as `displacements`.

{shift_probe_table([probe])}
"""


def ablations() -> str:
    first = result("quality_small_ablations.json")
    second = result("quality_small_ablations_tokenizers.json")
    return f"""## Ablations

Separate invocations of the same script on the same pretrained VAE, at 600 fine-tuning steps (e.g.
`python benchmarks/quality_small.py --variants baseline,global --set finetune.steps=600`), evaluated together
(`--phase eval`). Each variant is a diff over one base (radius 2 with the locality prior), explained by a one-line
comment in `recipes/configs/quality_small.yaml`; the JSON keeps the earlier names (`refdecoder_r2_prior_*`), mapped
in `benchmarks/quality/names.py`.

`quality_small_ablations.json`, motion clips and their rendered camera moves:

{quality_small_table.table(first, "motion")}

{quality_small_table.table(first, "motion/camera")}

`quality_small_ablations_tokenizers.json`, motion and static clips:

{quality_small_table.table(second, "motion")}

{quality_small_table.table(second, "static")}

What they show, at this scale: with the locality prior the attention scope matters little (radius 2
{gain(first, "r2")}, global {gain(first, "global")}, radius 0
{gain(first, "r0")} dB overall on motion clips); a flatter prior learns less
({gain(first, "slope1", key="psnr_0")} dB on the reference frame); token dropout costs most of the
gain ({gain(first, "drop03")} dB overall); training without camera motion gains more
({gain(first, "r2_still")} dB); per-stage tokenizers add to it
({gain(second, "ps_still")} dB, space-to-depth {gain(second, "s2d_still")}
dB; static clips {gain(second, "s2d_still", "static")} dB). These are the settings of the
`small-local` preset.
"""


def correspondence() -> str:
    parts = []
    runs = (("reference_probe_correspondence.json", 600), ("reference_probe_correspondence_default.json", 1200))
    for name, steps in runs:
        doc = result(name)["correspondence"]
        shifts = next(iter(doc["models"].values()))["shift_tokens"]
        rows = [[model] + [f"{g:+.2f}" for g in v["gain_frame0"]] for model, v in doc["models"].items()]
        head = ["model"] + [f"{s:+d}" for s in shifts]
        parts.append(f"`{name}` ({steps} fine-tuning steps, {doc['clips']} clips):\n\n{table(head, rows)}")
    joined = "\n\n".join(parts)
    return f"""## Does the use of the reference follow moved content?

`python benchmarks/reference_probe.py --correspondence OUT --models ...` decodes held-out clips with their frame 0
shifted sideways by k tokens (8 pixels each) and reports the PSNR gain on frame 0 (dB) over decoding with another
clip's frame 0. Every model copies at the reference's own position: the gain at a one-token shift is already below
zero.

{joined}
"""


def guided_shift_probe() -> str:
    files = ("reference_probe_shift_r2_ps_s2d_200.json", "reference_probe_shift_r2_ps_s2d_corr_200.json")
    probes = [result(name)["correspondence"] for name in files]
    doc = probes[-1]
    return f"""## Correspondence-guided attention: the shift probe at 200 steps

Short runs, not the default run: `python benchmarks/quality_small.py --phase finetune --set workers=1 --set
finetune.steps=200 --variants corr,s2d`, then `python
benchmarks/reference_probe.py --correspondence OUT --models MODEL --shifts 0,1,2,4 --crop 128,96
--true-displacements` (`{files[0]}`, `{files[1]}`). Frame-0 gain in dB over an unrelated reference, by shift in
tokens ({doc["token_pixels"]} pixels each), on {doc["clips"]} clips of 128x96 pixels: whole frame / the columns the
shifted reference shows. "estimated / in place": the model's own decode (the cost-volume estimate for the
correspondence model, the query's own position for the other); "true shift given": the shift passed as
`displacements`. Recorded with the first form of the estimate (every latent frame matched against the reference's
first-frame latents, displacements not snapped); the default run above uses the current one.

{shift_probe_table(probes)}
"""


def correspondence_estimate() -> str:
    doc = result("correspondence_estimate.json")
    est, shifts = doc["estimate"], doc["shift_cells"]
    crop = "x".join(str(v) for v in est["crop"])
    head = ["setting"] + [f"{k:+d}" for k in shifts]
    frame0 = [[name] + [f"{v:.2f}" for v in row["exact"]] for name, row in est["frame0"].items()]
    later = [[name] + [f"{v:.2f}" for v in row] for name, row in est["later_frames"].items()]
    heldout = ""
    if "heldout" in doc:
        h = doc["heldout"]
        cols = [("motion", "psnr"), ("motion", "psnr_0"), ("motion", "psnr_4+"), ("camera", "psnr_4+"),
                ("static", "psnr")]  # fmt: skip
        rows = [
            [spaces] + [f"{gains[g][k]:+.2f}" for g, k in cols if g in gains]
            for spaces, gains in h["gains_db"].items()
        ]
        names = ["estimate", "motion all", "motion frame 0", "motion frames 4+", "camera frames 4+", "static all"]
        heldout = f"""
Held-out gains (dB over `{h["baseline"]}`) of the default run's saved `{h["model"]}` (trained with the defaults:
`still_clip`, no global prior; `--run` its output folder) decoded as trained, with `frame_spaces: fitted`, with
`global_prior: 3` and, where the JSON has the row, with `per_frame` switched, its weights unchanged:

{table(names, rows)}
"""
        if "decode_only" in h:
            only = h["decode_only"]
            rows = [
                [label] + [f"{gains[g][k]:+.2f}" for g, k in cols if g in gains]
                for label, gains in only["gains_db"].items()
            ]
            heldout += f"""
The same architecture trained without correspondence (`{only["model"]}`, `--untrained`), decoded without and with
the estimate (the settings above, as trained), its weights unchanged:

{table(["estimate"] + names[1:], rows)}
"""
        if "camera_gains_db" in h:
            camera = [
                [name] + [f"{g[k]:+.2f}" for k in ("psnr", "psnr_0", "psnr_4+")]
                for name, g in h["camera_gains_db"].items()
            ]
            moved = h["camera_flow_mean_px_last_frame"]
            heldout += f"""
Its {h["camera_moves"]} rendered camera moves (mean flow at the last frame {moved:.1f} px) decoded with the estimate,
with each move's exact flow as `displacements` (`CameraPath.flow_to`; where the JSON has the row, also with
`per_frame` switched) and with zero displacement (dB over `{h["baseline"]}`):

{table(["displacements", "all", "frame 0", "frames 4+"], camera)}
"""
    return f"""## The correspondence estimate

`python benchmarks/correspondence_estimate.py --run OUT --untrained s2d` (`correspondence_estimate.json`): the
estimate alone, on the shipped pretrained VAE and the shift probe's {est["clips"]} natural held-out clips
({crop} px), each clip's frame 0 shifted by k latent cells ({est["cell_pixels"]} px) as the reference. Frame 0
(the reference's own feature space), the share of the shown columns' cells whose rounded displacement is exact,
without and with the confidence-weighted smoothing (the default), and with the frame's global translation in it
(`global_prior`):

{table(head, frame0)}

Latent frames 1+, mean |dx error| in cells by how the reference reaches their feature space (the clips' own motion
since frame 0 counts as error, alike for every row):

{table(head, later)}
{heldout}"""


def readme() -> str:
    sections = [quality(), ablations(), correspondence(), guided_shift_probe(), correspondence_estimate()]
    sections += [decode_overhead(), train_step()]
    sections += [attention_scope()]
    sections += [data_throughput(), gpu_decode()]
    head = """# Benchmark records

Generated by `python -m benchmarks.make_readme` from the JSON in `benchmarks/results/`; edit the script or re-run
the benchmark, not this file (`python -m refdecoder.tools.check_docs` fails when they differ). Each section names
the command that writes its JSON. CPU times were taken on shared 2-core development machines and are rough; FLOP
and parameter counts are exact. The measurement log that preceded this file (machine load, cross-machine runs,
stopped runs) is in the git history of the top-level README.
"""
    return "\n".join([head, *sections]).rstrip() + "\n"


def main() -> None:
    README.write_text(readme())
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        filled = fill_blocks(text)
        if filled != text:
            path.write_text(filled)
    print(f"wrote {README.relative_to(ROOT)} and the generated blocks")


if __name__ == "__main__":
    main()
