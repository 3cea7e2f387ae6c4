"""The names users choose from. Registries on each side map these names to code.

Kept apart from the registries so the config can validate a name on a machine that only
has one side installed (a client has no strategy code), and so the error lists every choice.
"""

STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
)
DATASETS = ("digits", "mnist1d", "file")
PARTITIONERS = ("iid", "dirichlet", "pathological")
MODELS = ("mlp", "cnn1d")
OPTIMIZERS = ("sgd", "adam")
