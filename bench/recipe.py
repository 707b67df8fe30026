"""The model and schedule of the demo against nanochat's ideas, side by side (issue: the best small
recipe in public). Every variant keeps MLA and MuonClip.

    python -m bench.recipe --variants before model schedule both        # seeds 0 and 1, 2 at a time
    python -m bench.recipe --table-only

Runs go to runs/recipe/<variant>-s<seed>; how they run and what is printed: bench/variants.py.
"""

from bench import variants

MODEL = ["--model.embed_norm", "--model.layer_lambdas", "--model.smear", "--model.backout", "--model.value_embeds",
         "--model.init=nanochat", "--model.logit_softcap=15", "--model.rope_theta=100000"]
SCHEDULE = ["--schedule.warmup_steps=40", "--schedule.cooldown_frac=0.65", "--schedule.min_lr_frac=0.05",
            "--schedule.momentum_start=0.85", "--optim.momentum=0.97", "--schedule.momentum_warmup_steps=400",
            "--schedule.momentum_cooldown=0.90", "--schedule.weight_decay_cosine"]
# name -> train.py overrides on top of configs/demo.toml
VARIANTS = {
    "before": [],
    "model": MODEL,
    "schedule": SCHEDULE,
    "both": MODEL + SCHEDULE,
}


def main(argv=None) -> list[dict]:
    return variants.main(argv, VARIANTS, baseline="before", root="runs/recipe", out="bench/results/recipe.png",
                         title="The demo's recipe against nanochat's ideas (600 steps, MLA, MuonClip)", doc=__doc__)


if __name__ == "__main__":
    main()
