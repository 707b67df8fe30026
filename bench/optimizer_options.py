"""Muon's options on the demo, side by side: today's recipe, each option alone, combinations.

    python -m bench.optimizer_options                          # every variant below, seeds 0 and 1, 2 at a time
    python -m bench.optimizer_options --variants muon normuon --seeds 0
    python -m bench.optimizer_options --table-only             # the table and plot of the runs already done

Runs go to runs/options/<variant>-s<seed>; how they run and what is printed: bench/variants.py.
"""

from bench import variants

# name -> train.py overrides on top of configs/demo.toml. "muon" is the recipe before NorMuon
# became the default: every variant says whether NorMuon is on.
OFF = "--optim.normuon=false"
VARIANTS = {
    "muon": [OFF],
    "normuon": ["--optim.normuon"],
    "normuon-larger": ["--optim.normuon", "--optim.normuon_axis=larger"],
    "cautious": [OFF, "--optim.cautious_weight_decay"],
    "per-head": [OFF, "--optim.per_head"],
    "clip-alpha-1": [OFF, "--optim.muon_clip_alpha=1.0"],
    "normuon+cautious": ["--optim.normuon", "--optim.cautious_weight_decay"],
    "normuon+per-head": ["--optim.normuon", "--optim.per_head"],
    "all": ["--optim.normuon", "--optim.cautious_weight_decay", "--optim.per_head"],
    # NorMuon re-swept: its per-neuron normalisation changes which entries the step moves most.
    "normuon-lr0.006": ["--optim.normuon", "--optim.lr=0.006"],
    "normuon-lr0.011": ["--optim.normuon", "--optim.lr=0.011"],
    "normuon-lr0.016": ["--optim.normuon", "--optim.lr=0.016"],
    # NorMuon with Polar Express, the pair in modded-nanogpt's and nanochat's optimizers.
    "normuon+polar": ["--optim.normuon", "--optim.ns_coefficients=polar_express"],
    "normuon-larger+polar": ["--optim.normuon", "--optim.normuon_axis=larger", "--optim.ns_coefficients=polar_express"],
}


def main(argv=None) -> list[dict]:
    return variants.main(argv, VARIANTS, baseline="muon", root="runs/options", out="bench/results/optimizer_options.png",
                         title="Muon's options on configs/demo.toml (600 steps, MuonClip on)", doc=__doc__)


if __name__ == "__main__":
    main()
