"""The names users choose from. Registries on each side map these names to code.

Kept apart from the registries so the config can validate a name on a machine that only
has one side installed (a client has no strategy code), and so the error lists every choice.
"""

from common.privacy.modes import MODES

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
MODELS = ("mlp", "logreg", "cnn1d")
OPTIMIZERS = ("sgd", "adam")
DP_MODES = tuple(MODES)  # none, server, client, dpsgd, local: see common/privacy/modes.py
CLIPPING = ("fixed", "adaptive")
SAMPLING = ("poisson", "fixed", "all")
LOCAL_MECHANISMS = ("gaussian", "laplace")
ACCOUNTANTS = ("rdp", "pld")

# User-level DP-FedAvg bounds the sensitivity of the MEAN update. These strategies aggregate
# by the (unweighted, fixed-denominator) mean and then take a server step, so the noisy mean
# can be handed to them as post-processing. Robust aggregators (median, trimmed mean, Krum,
# Bulyan) and q-FedAvg (loss-reweighted) have a different sensitivity.
MEAN_BASED_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
ATTACKS = ("none", "sign-flip", "scale", "noise")
