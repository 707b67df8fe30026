"""What a training run reports, on rank 0: the console, metrics.jsonl and Weights & Biases.

One run is one W&B run, and its record holds every value once, however often the run was killed
and resumed. At a step the loop logs its values (training loss, then val loss, completions,
heatmap) before it writes that step's checkpoint; so a run resumed from the checkpoint of step s
cuts metrics.jsonl back to the rows of steps <= s, rewinds its W&B run to step s (wandb.init's
resume_from: the history keeps the steps up to s and goes on from s + 1) and logs everything
after again. The checkpoint keeps the W&B run id and the
completions table so far. A resume that changes the numbers (another lr, more steps, ...) or the
run dir is a new W&B run; metrics.jsonl is cut back all the same.

W&B settings: a log.wandb_* key left "" (or []) leaves the choice to wandb's environment variables
(WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_NOTES); the project
then defaults to "muon-speedrun" and the name to the run dir's. A missing wandb package or a
failed wandb.init is a warning: W&B trouble changes what is logged, never the training.

It also measures what some rows hold: training time (TrainClock), the max logits per layer and
head, and with log.spectrum_every the spectra of the optimizer's first moment and of Muon's
orthogonalised update.
"""

import inspect
import io
import json
import os
import time
from pathlib import Path

import torch

import muon
from data.shard import write_atomically

DEFAULT_PROJECT = "muon-speedrun"
COMPLETION_COLUMNS = ["step", "prompt", "mode", "completion"]


class RunLog:
    """Rank 0's outputs; on other ranks every method does nothing."""

    def __init__(self, cfg, enabled: bool, run_config: dict, checkpoint: dict | None = None, continues: bool = False):
        """checkpoint: the one resumed from; continues: the resumed run is the run that wrote it, going
        on (checkpoint.continues_run), so its W&B run goes on too."""
        self.enabled, self.wandb_run, self.completions, self.table = enabled, None, [], None
        if not enabled:
            return
        self.run_dir = Path(cfg.train.run_dir)
        self.batch_tokens = cfg.train.batch_tokens
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.completions = [tuple(row) for row in checkpoint.get("completions", [])] if checkpoint else []
        if checkpoint:
            dropped = cut_back(self.run_dir / "metrics.jsonl", checkpoint["step"])
            if dropped:
                print(f"metrics.jsonl: {dropped} rows after step {checkpoint['step']} (the checkpoint's) were "
                      "dropped; this run logs them again")
        run_id = checkpoint.get("wandb_run_id") if continues else None
        self.wandb_run = start_wandb(cfg, self.run_dir, run_config, run_id, checkpoint["step"] if checkpoint else 0)
        self.incremental = self.wandb_run is not None and "log_mode" in inspect.signature(wandb_module().Table).parameters

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the log: the W&B run to continue and the completions so far."""
        if not self.enabled:
            return {}
        return {"wandb_run_id": self.wandb_run.id if self.wandb_run else None,
                "completions": [list(row) for row in self.completions]}

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {**values, "train/tokens": step * self.batch_tokens}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb_run:
            self.wandb_run.log(values, step=step)

    def heatmap(self, step: int, max_logits: torch.Tensor) -> None:
        if self.wandb_run:
            image = wandb_module().Image(heatmap_figure(max_logits.tolist(), step))
            self.wandb_run.log({"attn/max_logit_heatmap": image}, step=step)

    def completions_table(self, step: int, rows: list[tuple[str, str, str]]) -> None:
        if not self.enabled or not rows:
            return
        for prompt, mode, completion in rows:
            self.print(f"  [{mode}] {prompt!r} -> {completion!r}")
        new_rows = [(step, *row) for row in rows]
        self.completions += new_rows
        if not self.wandb_run:
            return
        wandb = wandb_module()
        if self.incremental:  # each log sends only the rows added since the last one
            if self.table is None:
                self.table = wandb.Table(columns=COMPLETION_COLUMNS, log_mode="INCREMENTAL")
            for row in new_rows:
                self.table.add_data(*row)
        else:  # an older wandb: tables are immutable, so log every row so far
            self.table = wandb.Table(columns=COMPLETION_COLUMNS, data=self.completions)
        self.wandb_run.log({"samples/completions": self.table}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb_run:
            self.wandb_run.summary.update(values)

    def finish(self, exit_code: int) -> None:
        if self.wandb_run:
            self.wandb_run.finish(exit_code=exit_code)


# ----------------------------------------------------------------------------------------------
# What the log lines hold, measured


def attention_metrics(max_logits: torch.Tensor, clipped: torch.Tensor | None) -> dict:
    """The largest attention logit overall, per layer and per head, and how many heads MuonClip clipped."""
    per_head = max_logits.tolist()
    per_layer = [max(heads) for heads in per_head]
    row = {"attn/max_logit": max(per_layer), **{f"attn/max_logit/layer_{i}": v for i, v in enumerate(per_layer)},
           **{f"attn/max_logit/layer_{i}/head_{h}": v for i, heads in enumerate(per_head) for h, v in enumerate(heads)}}
    if clipped is not None:  # summed over the interval's steps
        row["attn/clipped_heads"] = int(clipped)
    return row


def spectrum(matrix: torch.Tensor, top: int = 3) -> tuple[float, float]:
    """(stable rank ||M||_F^2 / ||M||_2^2, share of ||M||_F^2 in the `top` largest singular values).
    The stable rank is 1 for a rank-one matrix and min(A, B) for an orthogonal one."""
    energy = torch.linalg.svdvals(matrix.float()).square()
    return (energy.sum() / energy[0]).item(), (energy[:top].sum() / energy.sum()).item()


def spectrum_names(raw_model) -> list[str]:
    """The hidden matrices of a block, as log.spectrum_matrices names them ("attn.wo", "mlp.fc", ...)."""
    return [name.removesuffix(".weight") for name, p in raw_model.blocks[0].named_parameters() if p.ndim == 2]


def spectrum_metrics(raw_model, optimizer: muon.Muon, names: list[str]) -> dict:
    """For the named matrices of every block: the stable rank and top-3 energy share of the
    optimizer's first moment (Muon's momentum buffer; AdamW's exp_avg for the baseline) and, under
    Muon, the stable rank of the orthogonalised momentum NS(M), what Muon steps along."""
    groups = {p: group for group in optimizer.param_groups for p in group["params"]}
    row = {}
    for i, block in enumerate(raw_model.blocks):
        for name in names:
            p = block.get_parameter(f"{name}.weight")
            state = optimizer.state.get(p, {})
            moment = state.get("momentum_buffer", state.get("exp_avg"))
            if moment is None or not moment.any():  # no gradient yet (zero-initialised neighbours)
                continue
            key = f"spectrum/layer_{i}/{name}"
            row[f"{key}/moment_stable_rank"], row[f"{key}/moment_top3_energy"] = spectrum(moment)
            group = groups[p]
            if group["use_muon"]:
                update = muon.newton_schulz(moment, group["ns_coefficients"], group["ns_steps"], dtype=group["ns_dtype"])
                row[f"{key}/update_stable_rank"] = spectrum(update)[0]
    return row


class TrainClock:
    """Seconds spent training: validation, completions and checkpoints are left out, as the speedrun times it."""

    def __init__(self, device: torch.device, total: float = 0.0):
        self.device, self.total, self.started = device, total, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        if self.started is None:
            self._sync()
            self.started = time.perf_counter()

    def stop(self):
        if self.started is not None:
            self._sync()
            self.total += time.perf_counter() - self.started
            self.started = None


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def wandb_module():
    import wandb
    return wandb


def cut_back(metrics: Path, step: int) -> int:
    """Keep metrics.jsonl's rows of steps <= step (and none a kill left half-written); returns how many
    rows were dropped. The file is replaced whole, so a kill here loses nothing either."""
    if not metrics.exists():
        return 0
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) < len(lines):
        write_atomically(metrics, lambda f: f.write("".join(kept).encode()))
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def start_wandb(cfg, run_dir: Path, run_config: dict, run_id: str | None, last_step: int):
    """A wandb run, or None. run_id: the run to go on with, rewound so that its history ends at
    last_step (wandb.init's resume_from); if W&B cannot rewind it, a new run."""
    lg = cfg.log
    if lg.wandb == "disabled":
        return None
    try:
        wandb = wandb_module()
    except ImportError:
        print("warning: the wandb package is not installed; logging to the console and metrics.jsonl only")
        return None
    attempts = ([dict(resume_from=f"{run_id}?_step={last_step}")] if run_id else []) + [{}]
    for rewind in attempts:
        try:
            mode = lg.wandb
            if mode == "auto":
                mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(prompt=False, verify=False) else "offline")
            # W&B's own quiet setting: no history and summary printed when the run ends (they land in
            # the run all the same), unless WANDB_QUIET says otherwise.
            quiet = {} if "WANDB_QUIET" in os.environ else dict(settings=wandb.Settings(quiet=True))
            run = wandb.init(
                project=lg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                name=lg.wandb_name or os.environ.get("WANDB_NAME") or run_dir.name,
                # None: wandb reads WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_NOTES itself.
                entity=lg.wandb_entity or None, group=lg.wandb_group or None, tags=lg.wandb_tags or None,
                notes=lg.wandb_notes or None, dir=run_dir, config=run_config, mode=mode, **rewind, **quiet)
            break
        except Exception as e:
            then = "logging to a new W&B run" if rewind else "continuing with W&B disabled"
            what = f"wandb.init could not rewind run {run_id} to step {last_step}" if rewind else "wandb.init failed"
            print(f"warning: {what} ({type(e).__name__}: {e}); {then}")
    else:
        return None
    # Charts against tokens seen, so runs with other batch sizes line up; val/loss keeps its best.
    run.define_metric("train/tokens")
    for prefix in ("train/*", "val/*", "eval/*", "attn/*", "spectrum/*"):
        run.define_metric(prefix, step_metric="train/tokens")
    run.define_metric("val/loss", summary="min")
    return run


def heatmap_figure(max_logits: list[list[float]], step: int) -> "PIL.Image.Image":
    """A picture (matplotlib, as a PIL image) of the max logits, layers as rows and heads as columns, each cell labelled."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt
    import PIL.Image

    n_layer, n_head = len(max_logits), len(max_logits[0])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n_head, 0.8 + 0.4 * n_layer))
    image = ax.imshow(max_logits, cmap="Reds", vmin=0, aspect="auto")
    for layer, row in enumerate(max_logits):
        for head, value in enumerate(row):
            ax.text(head, layer, f"{value:.0f}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="head", ylabel="layer", xticks=range(n_head), yticks=range(n_layer),
           title=f"max attention logit, step {step}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return PIL.Image.open(png)
