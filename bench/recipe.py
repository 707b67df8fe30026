"""The demo's recipe (configs/demo.toml: nanochat's model ideas and schedules, with MLA and MuonClip)
against the recipe before them, side by side, and each model idea left out in turn.

    python -m bench.recipe                                       # every variant, seeds 0 and 1, 2 at a time
    python -m bench.recipe --variants before after               # the headline pair
    python -m bench.recipe --variants before after --steps 400 --root runs/recipe400 --extra --schedule.steps=400
    python -m bench.recipe --table-only

Runs go to runs/recipe/<variant>-s<seed>; how they run and what is printed: bench/variants.py.
"""

from bench import variants

# Each model idea and the value that turns it off: the model before the recipe had them all off,
# the recipe has all but layer_lambdas on.
MODEL_IDEAS = {"embed_norm": "false", "layer_lambdas": "false", "smear": "false", "backout": "false",
               "value_embeds": "false", "init": "speedrun", "logit_softcap": "0", "rope_theta": "10000"}
OLD_MODEL = [f"--model.{key}={off}" for key, off in MODEL_IDEAS.items()]
# The schedule before: no lr warmup, a 40% cooldown to 0, momentum 0.85 -> 0.95 over 100 steps, held.
OLD_SCHEDULE = ["--schedule.warmup_steps=0", "--schedule.cooldown_frac=0.4", "--schedule.min_lr_frac=0",
                "--optim.momentum=0.95", "--schedule.momentum_warmup_steps=100", "--schedule.momentum_cooldown=-1",
                "--schedule.weight_decay_cosine=false"]
OLD_TAU = ["--optim.muon_clip_tau=30"]
# name -> train.py overrides on top of configs/demo.toml
VARIANTS = {
    "before": OLD_MODEL + OLD_SCHEDULE + OLD_TAU,
    "after": [],
    "model-only": OLD_SCHEDULE + OLD_TAU,
    "schedule-only": OLD_MODEL + OLD_TAU,
    "tau-30": OLD_TAU,
    **{f"without-{key}": [f"--model.{key}={off}"] for key, off in MODEL_IDEAS.items() if key != "layer_lambdas"},
    "with-layer_lambdas": ["--model.layer_lambdas=true"],  # the idea the recipe leaves out
    # the README's comparisons on this recipe: the Muon of 2024, and AdamW on the matrices at three lrs
    "normuon-off": ["--optim.normuon=false"],
    "adamw-lr0.001": ["--optim.optimizer=adamw", "--optim.lr=0.001"],
    "adamw-lr0.002": ["--optim.optimizer=adamw", "--optim.lr=0.002"],
    "adamw-lr0.004": ["--optim.optimizer=adamw", "--optim.lr=0.004"],
}


def main(argv=None) -> list[dict]:
    return variants.main(argv, VARIANTS, baseline="before", root="runs/recipe", out="bench/results/recipe.png",
                         title="The demo's recipe before and after nanochat's ideas (MLA and MuonClip in both)",
                         doc=__doc__)


if __name__ == "__main__":
    main()
